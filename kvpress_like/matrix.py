"""The compatibility matrix (``docs/compatibility.md``): which method runs on which architecture and attention backend.

Each cell compresses a prompt of a tiny random model of a registered architecture (:mod:`kvpress_like.testing`:
every adapter with a ``tiny_config``, plugins' included), feeds a multi-token
continuation and checks the logits are finite; for backends other than SDPA it also compares the kept
tokens with SDPA's. Scores that tie up to float rounding (e.g. key norms of QK-normed keys, which are
all equal) may be broken differently by two backends: such cells report how many kept tokens differ,
and more than ``MAX_TIE_SHARE`` of them is a bug. A cell is ``ok`` or names the kvpress_like error that
refuses the combination; any other exception propagates. ``python -m kvpress_like.matrix``
prints the table.
"""

from __future__ import annotations

import torch

from kvpress_like.errors import KVPressLikeError
from kvpress_like.factory import build, needs_budget
from kvpress_like.plugins import get_registry
from kvpress_like.prefill import feed
from kvpress_like.testing import architectures, make_model, with_fitted_surrogate

BACKENDS = ("sdpa", "eager")
PROMPT_LENGTH = 128
MAX_TIE_SHARE = 0.1


def run_cell(method: str, model, input_ids: torch.Tensor) -> tuple[str, dict[int, torch.Tensor] | None]:
    """``("ok", kept masks per layer)``, or ``("refused: <error>", None)``, for one method on one model."""
    pipeline = build(method, budget=0.4) if needs_budget(method) else build(method)
    pipeline = with_fitted_surrogate(pipeline, model)  # learned methods: a surrogate fitted on this tiny model
    generator = torch.Generator().manual_seed(1)
    continuation = torch.randint(0, model.config.vocab_size, (input_ids.shape[0], 3), generator=generator)
    try:
        result = pipeline.prefill(model, input_ids)
        logits = feed(model, result.cache, continuation)
    except KVPressLikeError as error:
        return f"refused: {type(error).__name__}", None
    if not torch.isfinite(logits).all():
        raise AssertionError(f"{method}: non-finite logits after compression on {type(model).__name__}")
    return "ok", {i: layer.kept_mask(input_ids.shape[1]) for i, layer in result.report.layers.items()}


def compatibility_matrix(
    methods: list[str] | None = None, archs: list[str] | None = None
) -> dict[tuple[str, str, str], str]:
    """``(method, architecture, backend) -> status`` for the given (default: every registered) methods and
    architectures (adapter names)."""
    methods = methods or sorted(get_registry().methods)
    input_ids = torch.randint(0, 256, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    matrix = {}
    for arch in archs or architectures():
        models = {backend: make_model(arch, attn_implementation=backend) for backend in BACKENDS}
        for method in methods:
            reference = None
            for backend in BACKENDS:
                status, masks = run_cell(method, models[backend], input_ids)
                if reference is not None and masks is not None:
                    status = _compare(method, arch, masks, reference)
                reference = reference if reference is not None else masks
                matrix[(method, arch, backend)] = status
    return matrix


def _compare(method: str, arch: str, masks: dict, reference: dict) -> str:
    differing = sum(int((masks[i] & ~reference[i]).sum()) for i in reference)
    kept = sum(int(reference[i].sum()) for i in reference)
    if differing > MAX_TIE_SHARE * kept:
        raise AssertionError(f"{method} on {arch}: {differing} of {kept} kept tokens differ from SDPA's")
    return "ok" if differing == 0 else f"ok, {differing}/{kept} tied tokens broken differently"


def render_markdown(matrix: dict[tuple[str, str, str], str]) -> str:
    """One row per method, one column per architecture × backend."""
    methods = sorted({key[0] for key in matrix})
    columns = [(arch, backend) for arch in dict.fromkeys(key[1] for key in matrix) for backend in BACKENDS]
    header = "| method | " + " | ".join(f"{arch} {backend}" for arch, backend in columns) + " |"
    rule = "| --- |" + " --- |" * len(columns)
    rows = [
        f"| {method} | " + " | ".join(_cell(matrix[(method, arch, backend)]) for arch, backend in columns) + " |"
        for method in methods
    ]
    legend = (
        "✓ = compresses, decodes a multi-token continuation with finite logits, and keeps the same tokens "
        "as SDPA; ✗ = refused with the named error (never a silent wrong result). "
        "Compressed caches decode through the `kvpress_like` attention (each layer masked by its own rows), "
        "which a compressed prefill switches the model to. "
        "flash_attention_2 is not in the matrix: it needs a GPU (see the FAQ)."
    )
    return "\n".join([header, rule, *rows, "", legend, ""])


def _cell(status: str) -> str:
    if status == "ok":
        return "✓"
    if status.startswith("ok, "):
        return f"✓ ({status.removeprefix('ok, ')})"
    return f"✗ {status.removeprefix('refused: ')}"


if __name__ == "__main__":
    print(render_markdown(compatibility_matrix()))
