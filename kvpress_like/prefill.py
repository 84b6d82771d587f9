"""One prompt forward, any number of compressions.

The prompt is run once into a shared full cache. Pipelines whose window lies inside the prompt
(``suffix``, ``question``) compress during that forward, writing into their own caches; pipelines that
append tokens (``pseudo``, ``semantic``) then each run their few appended rows on a shallow copy of the
shared cache. With one pipeline this is exactly a normal compressed prefill; with many (an ablation)
the expensive prompt forward is paid once.
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from kvpress_like.adapters import ModelAdapter, get_adapter
from kvpress_like.cache import CompressedCache
from kvpress_like.compat import model_inputs
from kvpress_like.compressor import LayerCompressor
from kvpress_like.errors import UnsupportedInputError, UnsupportedModelError
from kvpress_like.plugins import get_plugin_manager
from kvpress_like.ragged import ragged_attention
from kvpress_like.report import CompressionReport


@dataclass
class PrefillResult:
    """A compressed prefill: the cache, the logits of prompt position L−1, and the report."""

    cache: CompressedCache
    next_token_logits: torch.Tensor
    report: CompressionReport


@torch.no_grad()
def prefill_many(
    model,
    input_ids: torch.Tensor,
    pipelines: list,
    attention_mask: torch.Tensor | None = None,
    question_span: tuple[int, int] | None = None,
) -> list[PrefillResult]:
    """Prefill ``input_ids`` ``[batch, L]`` once and compress it with every pipeline, in order."""
    check_inputs(input_ids, attention_mask)
    adapter = get_adapter(model)
    input_ids = input_ids.to(model.device)
    length = input_ids.shape[1]
    shared = CompressedCache(model.config)
    compressible = [i for i, layer in enumerate(shared.layers) if not getattr(layer, "is_sliding", False)]
    if not compressible:
        raise UnsupportedModelError(
            f"every attention layer of this {type(model).__name__} uses a sliding window "
            f"(sliding_window={getattr(model.config, 'sliding_window', None)}); kvpress_like compresses "
            "full-attention layers only. If your prompts are shorter than the window, load the model with "
            "sliding_window=None"
        )
    jobs = [_make_compressor(p, model, adapter, input_ids, question_span, shared, compressible) for p in pipelines]
    _check_backend(model, jobs)

    started = time.perf_counter()
    with ExitStack() as stack:
        for job in jobs:
            if job.plan.n_appended == 0:
                stack.enter_context(job.attached(adapter.attention_modules()))
            elif bool((job.plan.window_rows < length).any()):
                stack.enter_context(job.capturing(adapter.attention_modules()))
        logits = forward(model, shared, input_ids, torch.arange(length, device=model.device))
    prompt_seconds = time.perf_counter() - started

    for job in jobs:
        started = time.perf_counter()
        if job.plan.n_appended:
            job.source = job.target = shallow_copy(shared)
            job.row_offset = length
            with job.attached(adapter.attention_modules()):
                forward(model, job.target, job.plan.appended_ids, job.plan.appended_positions[0])
            job.report.seconds = time.perf_counter() - started
        else:
            job.report.seconds = sum(layer.seconds for layer in job.report.layers.values())
        for i, layer in enumerate(shared.layers):  # layers left alone: exactly the uncompressed prefill's
            if i not in job.budgets:
                job.target.layers[i] = copy.copy(layer)
        job.report.prefill_seconds = prompt_seconds
        job.report.cache_bytes_after = job.target.nbytes()
        job.report.cache_bytes_before = shared.nbytes()
        get_plugin_manager().hook.prefill_compressed(report=job.report, pipeline=job.pipeline)
    return [PrefillResult(job.target, logits, job.report) for job in jobs]


def _make_compressor(pipeline, model, adapter: ModelAdapter, input_ids, question_span, shared, compressible):
    plan = pipeline.window.plan(input_ids, question_span)
    budget = pipeline.budget.resolve(plan.prompt_length)
    layer_budgets = pipeline.allocator.layer_budgets(len(compressible), plan.prompt_length, budget)
    report = CompressionReport(
        pipeline.name, plan.prompt_length, budget,
        uncompressed_layers=[i for i in range(len(shared.layers)) if i not in compressible],
    )
    return LayerCompressor(
        plan=plan,
        source=shared,
        target=CompressedCache(model.config),
        scorer=pipeline.scorer,
        selector=pipeline.selector,
        budgets=dict(zip(compressible, layer_budgets, strict=True)),
        report=report,
        pipeline=pipeline,
        rope_at=adapter.rope_at,
        allocator=pipeline.allocator,
    )


def _check_backend(model, jobs: list[LayerCompressor]) -> None:
    """Per-layer budgets leave layers of different lengths; eager attention cannot mask them with one mask."""
    backend = getattr(model.config, "_attn_implementation", None)
    for job in jobs:
        lengths = {min(budget, job.plan.prompt_length) for budget in job.budgets.values()}
        if len(lengths) > 1 and backend == "eager":
            raise UnsupportedModelError(
                f"{job.pipeline.name!r} gives layers different budgets, which the eager attention backend "
                "cannot mask (it builds one mask for all layers); load the model with attn_implementation='sdpa'"
            )


def shallow_copy(cache: CompressedCache) -> CompressedCache:
    """A cache sharing the tensors of ``cache``; updates to either never affect the other.

    Every layer type rebinds its tensors on update instead of writing into them, so copying the layer
    objects is enough: reuse one compressed cache for several questions by copying it first.
    """
    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    twin.evicted = dict(cache.evicted)
    return twin


def forward(model, cache, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Run ``input_ids`` at ``positions`` into ``cache``; return the last row's logits."""
    out = model(**model_inputs(model, cache, input_ids=input_ids, position_ids=positions[None], logits_to_keep=1))
    return out.logits[:, -1]


def feed(model, cache: CompressedCache, input_ids: torch.Tensor, start_position: int) -> torch.Tensor:
    """Append ``input_ids`` to a compressed cache at positions ``start_position, …``; return the last logits.

    Caches with per-layer lengths take the tokens one at a time (see ``CompressedCache.get_mask_sizes``).
    """
    length = input_ids.shape[1]
    positions = torch.arange(start_position, start_position + length, device=model.device)
    with ragged_attention(model, cache):
        if not cache.uneven:
            return forward(model, cache, input_ids, positions)
        for i in range(length):
            logits = forward(model, cache, input_ids[:, i : i + 1], positions[i : i + 1])
        return logits


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise UnsupportedInputError("input_ids must be a LongTensor of shape [batch, prompt_length]")
    if input_ids.shape[1] == 0:
        raise UnsupportedInputError("input_ids is empty: the prompt needs at least one token")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise UnsupportedInputError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask.bool().all()):
            raise UnsupportedInputError(
                "padded batches are not supported: pass sequences of equal length without padding, or one at a time"
            )
