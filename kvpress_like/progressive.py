"""Compress-as-you-go: feed the prompt in chunks and compress every layer after each chunk.

A one-pass prefill (:func:`kvpress_like.prefill.compressed_prefill`) never holds the full cache, but its
forward still works on the whole prompt at once, so activations grow with the prompt. Here the prompt goes
through in chunks of ``prompt_chunk`` tokens. After each chunk every compressible layer holds at most its
budget: the rows kept so far and the chunk's rows are scored together and the layer keeps its budget.
Peak memory is then bounded by *budget + one chunk* (cache) and by the chunk (activations), whatever the
prompt's length.

What each round scores with: the method's own window, planned on the prompt *so far* (the prefix that ends
with this chunk; a question span counts once it is inside the prefix), restricted to the rows of this
chunk and the appended rows (earlier chunks' rows are gone). SnapKV's window is thus the chunk's last rows;
DapQ's pseudo queries sit right after the prefix. Intermediate rounds keep the layer's budget on every
head (uniformly; ``interim_factor`` times it if asked); the last round runs the method's allocator on what
survived, with the window planned on the whole prompt. So this is not the same method as an unchunked
prefill: it keeps the same number of tokens, and the same tokens whenever the prompt fits one chunk or the
budget (the interim one included) holds the whole prompt before the last chunk; in between it is the
streaming variant of the method (compress-as-you-go in a fixed cache, as InfiniPot, Kim et al. 2024).

Two kinds of parts stream differently. A window may plan a round otherwise than on the prefix
(:meth:`~kvpress_like.parts.WindowBuilder.plan_round`): KVzip's reconstruction repeats the round's chunk only
(KVzip's own chunking). A scorer may merge a held row's scores over the rounds
(:meth:`~kvpress_like.parts.Scorer.merge_rounds`): KVzip's ``max`` keeps the largest attention any round gave
it. So KVzip keeps the one-pass tokens only when the prompt fits one chunk. A scorer that reads hidden states
sums them over the rounds (Expected Attention: running query statistics, those of the whole prompt in the
last round). A model-wide allocator cannot stream (it ranks every layer of the whole prompt) and is refused.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from kvpress_like.adapters import get_adapter
from kvpress_like.allocators import UniformAllocator
from kvpress_like.attention import compressed_attention
from kvpress_like.cache import CompressedCache
from kvpress_like.compressor import LayerCompressor
from kvpress_like.errors import ConfigError, UnsupportedInputError
from kvpress_like.parts import WindowPlan
from kvpress_like.plugins import get_plugin_manager
from kvpress_like.position_wise import lean_mlps
from kvpress_like.prefill import (
    PrefillResult,
    appended_rows_dropped,
    check_chunk_size,
    check_inputs,
    forward,
    hand_over,
    make_compressor,
    prompt_and_window,
)
from kvpress_like.ragged import RaggedLayer


@dataclass
class RoundCompressor(LayerCompressor):
    """One chunk's round of a progressive prefill.

    ``local_plan`` is the window in the chunk's own coordinates (its rows, then the appended ones); each
    layer holds ``start`` rows from earlier rounds before them, so ``plan`` is that plan shifted, per layer.
    ``chunk_start`` is the position of the chunk's first token. Kept across rounds, per layer: ``positions``
    maps the held rows to prompt positions, ``spent`` sums the compression time, ``states`` is the scorer's
    own state (:class:`~kvpress_like.parts.LayerContext`) and ``held_scores`` the held rows' scores, for a
    scorer that merges rounds. The last round reports the kept indices, in prompt positions.
    """

    local_plan: WindowPlan | None = None
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    spent: dict[int, float] = field(default_factory=dict)
    states: dict[int, dict] = field(default_factory=dict)
    held_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    chunk_start: int = 0
    final: bool = False
    latest_scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def _step(self, module, layer_idx: int, source: CompressedCache, kwargs, start: int):
        started = time.perf_counter()
        local = self.local_plan
        self.plan = dataclasses.replace(local, prompt_length=start + local.prompt_length,
                                        window_rows=local.window_rows + start)
        layer = source.layers[layer_idx]
        kept, keys, values = self.select(module, layer_idx, layer.keys, layer.values, kwargs, start)
        if self.scorer.merges_rounds and isinstance(keys, torch.Tensor):
            self.held_scores[layer_idx] = self.latest_scores.pop(layer_idx).gather(-1, kept)
        chunk = torch.arange(self.chunk_start, self.chunk_start + local.prompt_length, device=layer.keys.device)
        chunk = chunk.expand(*layer.keys.shape[:2], -1)
        held = torch.cat([self.positions[layer_idx], chunk], dim=-1) if layer_idx in self.positions else chunk
        seen = self.chunk_start + local.prompt_length
        if isinstance(keys, torch.Tensor):
            self.positions[layer_idx] = held.gather(-1, kept)
            source.replace_layer(layer_idx, keys, values, seen=seen)
            kept = self.positions[layer_idx]
        else:  # the last round's head-adaptive allocation (earlier rounds are uniform)
            source.replace_with_ragged(layer_idx, RaggedLayer(keys, values), seen=seen)
            kept = [[held[b, h, index] for h, index in enumerate(row)] for b, row in enumerate(kept)]
        self.spent[layer_idx] = self.spent.get(layer_idx, 0.0) + time.perf_counter() - started
        return kept if self.final else None

    def select(self, module, layer_idx: int, all_keys, all_values, kwargs, start: int):
        """A scorer that sums hidden states or merges rounds sees every round, also one that keeps every row."""
        scorer = self.scorer
        if self.plan.prompt_length <= self.budgets[layer_idx] and (scorer.accumulates_hidden_states
                                                                   or scorer.merges_rounds):
            self._scores(module, layer_idx, all_keys, all_values, kwargs, start)
        return super().select(module, layer_idx, all_keys, all_values, kwargs, start)

    def _scores(self, module, layer_idx: int, keys, values, kwargs, start: int) -> torch.Tensor:
        """This round's scores; the rows held from earlier rounds merged with their earlier scores."""
        scores = super()._scores(module, layer_idx, keys, values, kwargs, start)
        earlier = self.held_scores.pop(layer_idx, None)
        if earlier is not None:
            held = earlier.shape[-1]
            scores = torch.cat([self.scorer.merge_rounds(earlier, scores[..., :held]), scores[..., held:]], dim=-1)
        if self.scorer.merges_rounds:
            self.latest_scores[layer_idx] = scores
        return scores

    def _prompt_context(self, layer_idx: int, kwargs, start: int) -> dict:
        """The chunk's hidden states, where the prefix ends, and the scorer's state kept across rounds."""
        rows = self.local_plan.prompt_length
        return {"hidden_states": kwargs["hidden_states"][:, :rows], "hidden_start": self.chunk_start,
                "prompt_end": self.chunk_start + rows, "state": self.states.setdefault(layer_idx, {})}


@torch.no_grad()
def progressive_prefill(
    model, input_ids: torch.Tensor, pipeline, prompt_chunk: int, question_span=None, chunk_size: int | None = None,
    interim_factor: float = 1.0,
) -> PrefillResult:
    """Prefill ``input_ids`` ``[batch, L]`` about ``prompt_chunk`` tokens at a time, compressing after each chunk.

    The first chunk takes the remainder (``L mod prompt_chunk``), so the last chunk, whose round uses the
    method's real window, is a whole one. Intermediate rounds keep ``interim_factor`` × each layer's budget
    (≥ 1: more memory, fewer tokens dropped before the last chunk — where a question usually is — is seen).
    """
    check_inputs(input_ids, None)
    check_chunk_size(prompt_chunk)
    check_chunk_size(chunk_size)
    check_interim_factor(interim_factor)
    _check_streams(pipeline)
    adapter = get_adapter(model)
    input_ids = input_ids.to(model.device)
    length = input_ids.shape[1]
    cache = CompressedCache(model.config)
    whole = make_compressor(pipeline, model, adapter, input_ids, question_span, cache, target=None)
    report, positions, spent, states, held_scores = whole.report, {}, {}, {}, {}
    interim = {layer: math.ceil(budget * interim_factor) for layer, budget in whole.budgets.items()}
    sliding = [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_sliding", False)]
    ends = sorted({length - k * prompt_chunk for k in range(-(-length // prompt_chunk))})
    started, chunk_start, logits = time.perf_counter(), 0, None
    cache.track_peak = True
    for end in ends:
        final = end == length
        local = _local_plan(_round_plan(pipeline, input_ids[:, :end], chunk_start, question_span), chunk_start)
        job = RoundCompressor(
            plan=local, target=None, scorer=pipeline.scorer, selector=pipeline.selector,
            allocator=pipeline.allocator if final else UniformAllocator(),
            budgets=whole.budgets if final else interim, report=report,
            pipeline=pipeline, rope_at=adapter.rope_at, local_plan=local, positions=positions, spent=spent,
            states=states, held_scores=held_scores, chunk_start=chunk_start, final=final,
        )
        ids, rows = prompt_and_window(input_ids[:, chunk_start:end], local, start=chunk_start)
        with ExitStack() as stack:
            stack.enter_context(compressed_attention(model, cache))
            stack.enter_context(job.attached(adapter.attention_modules()))
            stack.enter_context(appended_rows_dropped(adapter, cache, sliding, local.n_appended))
            stack.enter_context(lean_mlps(adapter.decoder.layers, chunk_size))
            logits = forward(model, cache, ids, rows, logits_row=end - chunk_start - 1)
        cache.own_masks = True  # layers now hold fewer rows than tokens seen: the next chunk needs its own masks
        cache.added_valid.clear()  # every row held is a prompt row
        chunk_start = end
    cache.track_peak = False
    for i, layer_report in report.layers.items():
        layer_report.seconds = spent[i]
    report.seconds = sum(spent.values())
    report.prefill_seconds = time.perf_counter() - started - report.seconds
    report.cache_bytes_before = cache.uncompressed_nbytes(length, whole.budgets)
    report.cache_bytes_after = cache.nbytes()
    report.peak_cache_bytes = cache.peak_nbytes
    report.chunk_size, report.prompt_chunk = chunk_size, prompt_chunk
    hand_over(model, cache)
    get_plugin_manager().hook.prefill_compressed(report=report, pipeline=pipeline)
    return PrefillResult(cache, logits, report)


def check_interim_factor(interim_factor: float) -> None:
    if isinstance(interim_factor, bool) or not isinstance(interim_factor, int | float) or not interim_factor >= 1:
        raise ConfigError(f"interim_factor must be a number ≥ 1 (the share of each layer's budget kept between "
                          f"chunks: 1 = the budget, 2 = twice it), got {interim_factor!r}")


def why_not_streaming(pipeline) -> str | None:
    """Why ``pipeline`` cannot run a progressive prefill, or ``None`` if it can."""
    scorer = pipeline.scorer
    if scorer.reads_hidden_states and not scorer.accumulates_hidden_states:
        return (f"the {scorer.name!r} scorer reads the whole prompt's hidden states, which a progressive prefill "
                "never holds (a scorer that sums them chunk by chunk declares accumulates_hidden_states)")
    if pipeline.allocator.model_wide:
        return (f"the {pipeline.allocator.name!r} allocator ranks every layer's scores of the whole prompt together, "
                "so the full cache must exist before any layer is pruned")
    if not getattr(pipeline.window, "streams", True):
        return (f"the {pipeline.window.name!r} window's rounds append rows that grow with the prompt, so a "
                "progressive prefill would not save memory")
    return None


def _check_streams(pipeline) -> None:
    reason = why_not_streaming(pipeline)
    if reason:
        raise UnsupportedInputError(f"{reason}: prefill without prompt_chunk (chunk_size still bounds the MLP "
                                    "activations)")


def _round_plan(pipeline, prefix: torch.Tensor, chunk_start: int, question_span) -> WindowPlan:
    """The method's window for the round whose chunk starts at ``chunk_start`` and ends the prefix (see
    :meth:`~kvpress_like.parts.WindowBuilder.plan_round`); a question span counts once it is inside."""
    span = question_span if question_span is not None and question_span[1] <= prefix.shape[1] else None
    try:
        return pipeline.window.plan_round(prefix, chunk_start, span)
    except Exception as error:
        raise UnsupportedInputError(
            f"a progressive prefill plans the {pipeline.window.name!r} window on every prefix of the prompt, and "
            f"it cannot plan one of {prefix.shape[1]} tokens ({error}): prefill without prompt_chunk"
        ) from error


def _local_plan(plan: WindowPlan, chunk_start: int) -> WindowPlan:
    """``plan`` (prefix coordinates) in the chunk's coordinates: its rows before the chunk are dropped."""
    rows = plan.window_rows
    local = rows[rows >= chunk_start] - chunk_start
    return dataclasses.replace(plan, prompt_length=plan.prompt_length - chunk_start, window_rows=local)
