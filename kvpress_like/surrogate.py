"""Learned score surrogates: per-layer maps from a token's attention input to its teacher's (log) score.

KVzap (arXiv 2601.07891) fits, for every layer, a Ridge regression or a two-layer MLP
from the hidden state that enters the attention module to the log of KVzip's score of that token, one output
per KV head; scoring is then one matmul (or two) on hidden states already in flight: no extra forward.

An artifact is a folder with two files: ``surrogate.safetensors`` (the weights, ``layers.{i}.*``) and
``surrogate.json`` (format, kind, the fingerprint of the model it was fitted on, the teacher's configuration,
the data, held-out metrics per layer, and the sha256 of the weights file). :func:`load_surrogate` checks the
checksum; :meth:`Surrogate.check_module` checks, once per attention module, that the module's weights are
the ones the artifact was fitted on, so a wrong model is a clear error instead of silent garbage.
Artifacts shipped with the package live in ``kvpress_like/surrogates/<name>/`` (:func:`shipped_artifacts`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

from kvpress_like.errors import ConfigError

FORMAT = "kvpress_like.surrogate/1"
WEIGHTS_FILE, META_FILE = "surrogate.safetensors", "surrogate.json"
SHIPPED_ROOT = Path(__file__).parent / "surrogates"
Kind = Literal["linear", "mlp"]
_FINGERPRINT_VALUES = 4096  # leading values of each parameter that enter a module's fingerprint


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of an attention module's parameters: names, shapes and their first values at bfloat16 precision
    (so the same checkpoint loaded in float32 or bfloat16 gives the same fingerprint)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(module.named_parameters()):
        values = parameter.detach().flatten()[:_FINGERPRINT_VALUES].float().to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(parameter.shape)}:".encode())
        digest.update(values.cpu().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Surrogate:
    """Per-layer weights and the artifact's metadata.

    ``layers[i]`` holds ``weight`` ``[hidden, kv_heads]`` and ``bias`` ``[kv_heads]`` (linear), or ``w1``
    ``[hidden, width]``, ``b1``, ``w2`` ``[width, kv_heads]``, ``b2`` (mlp: ``gelu(h w1 + b1) w2 + b2``).
    ``meta["model"]["layers"]`` maps each layer index (a string) to the fingerprint of its attention module.
    """

    kind: Kind
    layers: dict[int, dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    _checked: dict[int, int] = field(default_factory=dict, repr=False)  # layer -> id of the module found right

    def predict(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Predicted scores ``[batch, kv_heads, T]`` of the rows ``hidden_states`` ``[batch, T, hidden]``."""
        weights = self._layer(layer_idx)
        hidden = hidden_states.to(torch.float32)
        if self.kind == "linear":
            out = hidden @ weights["weight"] + weights["bias"]
        else:
            out = torch.nn.functional.gelu(hidden @ weights["w1"] + weights["b1"]) @ weights["w2"] + weights["b2"]
        return out.transpose(1, 2)

    def _layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        if layer_idx not in self.layers:
            raise ConfigError(
                f"the surrogate {self.source} has no weights for layer {layer_idx} (it has layers "
                f"{sorted(self.layers)}): it was fitted on another model or other compressed layers"
            )
        return self.layers[layer_idx]

    def check_module(self, layer_idx: int, module: torch.nn.Module, hidden_size: int) -> None:
        """Refuse a module that is not the one this artifact was fitted on (checked once per module)."""
        if self._checked.get(layer_idx) == id(module):
            return
        weights = self._layer(layer_idx)
        expected_size = (weights["weight"] if self.kind == "linear" else weights["w1"]).shape[0]
        if expected_size != hidden_size:
            raise ConfigError(
                f"the surrogate {self.source} reads hidden states of size {expected_size}, this model's are "
                f"{hidden_size}: it was fitted on {self.model_name}; train one for this model "
                "(kvpress-like train-scorer MODEL --teacher kvzip --out DIR)"
            )
        expected = self.meta.get("model", {}).get("layers", {}).get(str(layer_idx))
        if expected is not None and module_fingerprint(module) != expected:
            raise ConfigError(
                f"layer {layer_idx} of this model is not the layer the surrogate {self.source} was fitted on "
                f"({self.model_name}; the weights' fingerprints differ): train one for this model "
                "(kvpress-like train-scorer MODEL --teacher kvzip --out DIR)"
            )
        self._checked[layer_idx] = id(module)

    @property
    def model_name(self) -> str:
        return str(self.meta.get("model", {}).get("name", "an unnamed model"))

    def matches(self, layer_idx: int, module: torch.nn.Module) -> bool:
        """Whether ``module`` is the attention module of layer ``layer_idx`` this artifact was fitted on."""
        return self.meta.get("model", {}).get("layers", {}).get(str(layer_idx)) == module_fingerprint(module)


def save_surrogate(surrogate: Surrogate, folder: str | Path) -> Path:
    """Write ``surrogate.safetensors`` and ``surrogate.json`` (with the weights' sha256) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.{name}": tensor.contiguous()
               for i, layer in surrogate.layers.items() for name, tensor in layer.items()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    meta = {**surrogate.meta, "format": FORMAT, "kind": surrogate.kind, "sha256": file_sha256(folder / WEIGHTS_FILE)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return folder


def load_surrogate(path: str | Path) -> Surrogate:
    """An artifact folder (or a shipped artifact's name, see :func:`shipped_artifacts`), checksum checked."""
    folder = _artifact_folder(path)
    stamps = tuple((folder / name).stat().st_mtime_ns for name in (WEIGHTS_FILE, META_FILE))
    return _load(str(folder.resolve()), stamps)


@lru_cache(maxsize=8)
def _load(folder: str, _stamps: tuple[int, int]) -> Surrogate:
    """One artifact, read once while neither of its files changes."""
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{folder} holds a surrogate of format {meta.get('format')!r}; this version reads {FORMAT!r}")
    actual = file_sha256(Path(folder) / WEIGHTS_FILE)
    if actual != meta.get("sha256"):
        raise ConfigError(
            f"{folder}/{WEIGHTS_FILE} does not match the checksum in {META_FILE} ({actual[:12]} vs "
            f"{str(meta.get('sha256'))[:12]}): the weights were changed or damaged; retrain or reinstall"
        )
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(Path(folder) / WEIGHTS_FILE)).items():
        _, index, name = key.split(".")
        layers.setdefault(int(index), {})[name] = tensor.float()
    return Surrogate(meta["kind"], layers, meta, source=folder)


def _artifact_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not (folder / META_FILE).is_file() and (SHIPPED_ROOT / str(path) / META_FILE).is_file():
        folder = SHIPPED_ROOT / str(path)
    if not (folder / META_FILE).is_file():
        raise ConfigError(
            f"no surrogate artifact at {path!r}: give a folder with {META_FILE} and {WEIGHTS_FILE} "
            f"(kvpress-like train-scorer writes one) or a shipped name ({', '.join(shipped_artifacts()) or 'none'})"
        )
    return folder


def shipped_artifacts() -> list[str]:
    """Names of the artifacts shipped with the package (``<model>-<teacher>``)."""
    if not SHIPPED_ROOT.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_ROOT.iterdir() if (p / META_FILE).is_file())


def shipped_for(teacher: str, layer_idx: int, module: torch.nn.Module) -> Surrogate:
    """The shipped artifact distilled from ``teacher`` that was fitted on this layer's attention ``module``."""
    candidates = [load_surrogate(name) for name in shipped_artifacts()]
    family = [s for s in candidates if s.meta.get("teacher", {}).get("family") == teacher]
    for surrogate in family:
        if surrogate.matches(layer_idx, module):
            return surrogate
    fitted_on = ", ".join(sorted({s.model_name for s in family})) or "no model"
    raise ConfigError(
        f"no shipped {teacher!r} surrogate was fitted on this model (shipped for: {fitted_on}); train one with "
        f"kvpress-like train-scorer MODEL --teacher {teacher} --out DIR and pass artifact=DIR"
    )
