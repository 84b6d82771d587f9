"""Compressed prefills: one pipeline in one forward, or many pipelines sharing one prompt forward.

:func:`compressed_prefill` (what :meth:`Pipeline.prefill` runs) feeds the prompt *and* the window's
appended rows (DapQ's pseudo queries, a ``semantic``/``union`` window) through the model together. Causal
attention keeps prompt rows blind to the appended ones, so every score equals a two-pass computation.
Each attention layer is compressed inside the forward, right after it has written its keys and values:
the kept rows replace the layer's cache in place, so a prefill never holds more than *the kept cache +
one layer's full keys/values + the appended rows*. The MLPs, which hold the forward's largest activations
(``L × intermediate_size`` several times over), run lean (:mod:`kvpress_like.position_wise`: a gated MLP's
product is written in place, bit-identical); with ``chunk_size`` they also run on ``chunk_size`` rows at a
time; attention already runs over the whole prompt in ``O(L)`` memory (SDPA). Neither changes the result
beyond rounding, so every method keeps the tokens of an unchunked prefill, and the cache is still compressed layer by
layer (feeding the prompt itself in chunks would have to hold the earlier chunks' uncompressed cache until
the window's queries exist: :mod:`kvpress_like.progressive` does that with each method's streaming variant).

:func:`prefill_many` (ablations) serves several pipelines from one prompt forward: it holds the full
cache of the prompt while it writes a compressed copy per pipeline, and pipelines with appended rows
run those rows over a shallow copy of it. Pipelines with the same window and scorer (one method at
several budgets) share that forward and one scoring, and select per budget. Its reports say
``shared_full_cache=True``; one pipeline in it runs :func:`compressed_prefill` and keeps exactly what
:meth:`Pipeline.prefill` keeps.
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from kvpress_like.adapters import ModelAdapter, get_adapter
from kvpress_like.attention import compressed_attention, use_compressed_attention
from kvpress_like.cache import CompressedCache
from kvpress_like.compat import model_inputs, record_sliding_past
from kvpress_like.compressor import LayerCompressor, PaddedBatchCompressor
from kvpress_like.errors import ConfigError, UnsupportedInputError, UnsupportedModelError
from kvpress_like.parts import WindowPlan
from kvpress_like.plugins import get_plugin_manager
from kvpress_like.position_wise import lean_mlps
from kvpress_like.query_tap import tapped_queries
from kvpress_like.ragged import RaggedLayer
from kvpress_like.report import CompressionReport


@dataclass
class PrefillResult:
    """A compressed prefill: the cache, the logits of prompt position L−1, and the report."""

    cache: CompressedCache
    next_token_logits: torch.Tensor
    report: CompressionReport


@torch.no_grad()
def compressed_prefill(
    model,
    input_ids: torch.Tensor,
    pipeline,
    attention_mask: torch.Tensor | None = None,
    question_span: tuple[int, int] | None = None,
    chunk_size: int | None = None,
) -> PrefillResult:
    """Prefill ``input_ids`` ``[batch, L]`` and compress every layer inside the same forward.

    A left-padded batch (``attention_mask`` with zeros on the left) compresses each sequence as if it ran
    alone; ``question_span`` is then a list with one span (or ``None``) per sequence, in its own positions.
    """
    check_inputs(input_ids, attention_mask)
    check_chunk_size(chunk_size)
    adapter = get_adapter(model)
    input_ids = input_ids.to(model.device)
    cache = CompressedCache(model.config)
    padded = is_padded(attention_mask)
    if padded:
        job, ids, positions, forward_mask = _padded_forward_inputs(
            pipeline, model, adapter, input_ids, attention_mask.to(model.device).bool(), question_span, cache
        )
    else:
        job = make_compressor(pipeline, model, adapter, input_ids, question_span, cache, target=None)
        (ids, positions), forward_mask = prompt_and_window(input_ids, job.plan), None
    sliding = [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_sliding", False)]

    started = time.perf_counter()
    cache.track_peak = True
    with ExitStack() as stack:
        stack.enter_context(job.attached(adapter.attention_modules()))
        if not padded:  # one forward holds every window row: its queries come from the model's attention call
            job.query_tap = stack.enter_context(tapped_queries(model, _modules(adapter, job.scored_layers),
                                                               _forward_rows(job.plan)))
        stack.enter_context(appended_rows_dropped(adapter, cache, sliding, job.plan.n_appended))
        stack.enter_context(lean_mlps(adapter.decoder.layers, chunk_size))
        last_prompt_row = job.plan.prompt_length - 1
        logits = forward(model, cache, ids, positions, logits_row=last_prompt_row, attention_mask=forward_mask)
    job.finish(cache)
    cache.track_peak = False
    job.report.seconds = sum(layer.seconds for layer in job.report.layers.values())
    job.report.prefill_seconds = time.perf_counter() - started - job.report.seconds
    job.report.cache_bytes_before = sum(job.full_layer_bytes.values()) + sum(
        cache.layer_nbytes(i) for i in range(len(cache.layers)) if i not in job.full_layer_bytes
    )
    job.report.cache_bytes_after = cache.nbytes()
    job.report.peak_cache_bytes = cache.peak_nbytes
    job.report.chunk_size = chunk_size
    hand_over(model, cache, padded)
    get_plugin_manager().hook.prefill_compressed(report=job.report, pipeline=pipeline)
    return PrefillResult(cache, logits, job.report)


@torch.no_grad()
def prefill_many(
    model,
    input_ids: torch.Tensor,
    pipelines: list,
    attention_mask: torch.Tensor | None = None,
    question_span: tuple[int, int] | None = None,
) -> list[PrefillResult]:
    """Prefill ``input_ids`` ``[batch, L]`` once and compress it with every pipeline, in order.

    With several pipelines the prompt's full cache is held (``report.shared_full_cache``) so that one
    forward serves them all; pipelines with the same window and scorer (one method at several budgets)
    also share one forward of their appended rows and one scoring. With one pipeline this is
    :func:`compressed_prefill`. A left-padded batch (``attention_mask``; ``question_span`` then one span
    or ``None`` per sequence) compresses each sequence as if it ran alone, as :func:`compressed_prefill`
    does; :func:`kvpress_like.unbatch.split_batch` turns each result into one result per sequence.
    """
    if len(pipelines) == 1:
        return [compressed_prefill(model, input_ids, pipelines[0], attention_mask, question_span)]
    check_inputs(input_ids, attention_mask)
    adapter = get_adapter(model)
    input_ids = input_ids.to(model.device)
    mask = attention_mask.to(model.device).bool() if is_padded(attention_mask) else None
    shared = CompressedCache(model.config)
    shared.token_mask = mask
    memos: dict[tuple, dict] = {}
    keys = [(_part_key(p.window), _part_key(p.scorer)) for p in pipelines]
    if mask is None:
        jobs = [
            make_compressor(p, model, adapter, input_ids, question_span, shared,
                             target=CompressedCache(model.config), scores_memo=memos.setdefault(key, {}))
            for p, key in zip(pipelines, keys, strict=True)
        ]
    else:
        jobs = [
            _padded_batch_compressor(p, model, adapter, input_ids, mask, question_span, shared,
                                     target=CompressedCache(model.config),
                                     memos=[memos.setdefault((key, b), {}) for b in range(input_ids.shape[0])])
            for p, key in zip(pipelines, keys, strict=True)
        ]

    started = time.perf_counter()
    shared.track_peak = True
    with ExitStack() as stack:
        for job in jobs:
            stack.enter_context(job.attached(adapter.attention_modules()))
        logits = forward(model, shared, input_ids, prompt_and_window(input_ids, None, mask)[1], attention_mask=mask)
    shared.track_peak = False
    prompt_seconds = time.perf_counter() - started - sum(job.seconds_spent for job in jobs)

    groups: dict[tuple[str, str], list[LayerCompressor]] = {}
    for job, key in zip(jobs, keys, strict=True):
        if job.plan.n_appended:  # the same window and scorer: one forward of the appended rows serves them all
            groups.setdefault(key, []).append(job)
        else:
            job.finish(shared)
            job.report.seconds = job.seconds_spent
    for group in groups.values():
        started = time.perf_counter()
        with ExitStack() as stack:
            for job in group:
                stack.enter_context(job.attached(adapter.attention_modules()))
            forward(model, shallow_copy(shared), group[0].plan.appended_ids, group[0].plan.appended_positions,
                    attention_mask=None if mask is None else torch.cat([mask, _appended_valid(group[0])], dim=1))
        for job in group:
            job.finish(shared)
        for job in group:  # what each would cost alone: the shared forward and the scoring
            job.report.seconds = time.perf_counter() - started
    for job in jobs:
        for i, layer in enumerate(shared.layers):  # layers left alone: exactly the uncompressed prefill's
            if i not in job.budgets:
                job.target.layers[i] = copy.copy(layer)
        job.report.prefill_seconds = prompt_seconds
        job.report.cache_bytes_after = job.target.nbytes()
        job.report.cache_bytes_before = shared.nbytes()
        job.report.shared_full_cache = True
        job.target.token_mask = mask
        hand_over(model, job.target, padded=mask is not None)
    held = shared.peak_nbytes + sum(job.target.nbytes() for job in jobs)
    for job in jobs:
        job.report.peak_cache_bytes = held
        get_plugin_manager().hook.prefill_compressed(report=job.report, pipeline=job.pipeline)
    return [PrefillResult(job.target, logits, job.report) for job in jobs]


def hand_over(model, cache: CompressedCache, padded: bool = False) -> None:
    """A cache that lost rows, whose heads hold different numbers of rows or that came from a padded batch
    is masked layer by layer from now on: the model gets the attention that does it."""
    ragged = any(isinstance(layer, RaggedLayer) for layer in cache.layers)
    cache.own_masks = padded or ragged or any(evicted > 0 for evicted in cache.evicted.values())
    if cache.own_masks:
        use_compressed_attention(model)


def _part_key(part) -> str:
    """Registered name and configuration: parts with equal keys compute the same thing."""
    return f"{part.name}:{part.config.model_dump_json()}"


def prompt_and_window(
    input_ids: torch.Tensor, plan, mask: torch.Tensor | None = None, start: int = 0
) -> tuple[torch.Tensor, ...]:
    """Ids ``[batch, L+N]`` and positions ``[batch, L+N]``: the prompt (from position ``start``), then the
    window's appended rows (if any).

    With a left-padding ``mask`` each sequence's positions start at 0 on its first real token.
    """
    batch, length = input_ids.shape
    if mask is None:
        positions = torch.arange(start, start + length, device=input_ids.device).expand(batch, length)
    else:
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    if plan is None or not plan.n_appended:
        return input_ids, positions
    ids = torch.cat([input_ids, plan.appended_ids.to(input_ids.device)], dim=1)
    return ids, torch.cat([positions, plan.appended_positions.to(input_ids.device)], dim=1)


@contextmanager
def appended_rows_dropped(adapter: ModelAdapter, cache: CompressedCache, layers: list[int], rows: int):
    """Layers left uncompressed (sliding-window ones) forget the appended rows right after their attention."""
    if not rows or not layers:
        yield
        return
    for i in layers:
        record_sliding_past(cache.layers[i])

    def drop(module, args, output) -> None:
        cache.drop_trailing_rows(module.layer_idx, rows)

    handles = [module.register_forward_hook(drop) for module in _modules(adapter, layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _modules(adapter: ModelAdapter, layers: list[int]) -> list[torch.nn.Module]:
    """The attention modules of ``layers``."""
    wanted = set(layers)
    return [module for module in adapter.attention_modules() if module.layer_idx in wanted]


def _forward_rows(plan: WindowPlan) -> slice | torch.Tensor:
    """The window's rows in a forward that starts at the prompt's first row: a slice when they are one run."""
    return plan.window_rows if plan.row_run is None else slice(*plan.row_run)


def is_padded(attention_mask: torch.Tensor | None) -> bool:
    """Whether ``attention_mask`` marks any left padding."""
    return attention_mask is not None and not bool(attention_mask.bool().all())


def _padded_forward_inputs(pipeline, model, adapter, input_ids, mask, question_span, cache) -> tuple:
    """The compressor of a left-padded batch and its forward's ids, positions and 2-D mask."""
    job = _padded_batch_compressor(pipeline, model, adapter, input_ids, mask, question_span, cache, target=None)
    ids, positions = prompt_and_window(input_ids, job.plan, mask)
    cache.token_mask = mask
    return job, ids, positions, torch.cat([mask, _appended_valid(job)], dim=1)


def _appended_valid(job: PaddedBatchCompressor) -> torch.Tensor:
    """``[batch, n_appended]``: which appended rows each sequence uses (a window appending fewer rows than
    another sequence's leaves padding at the end)."""
    rows = torch.arange(job.plan.n_appended, device=job.plan.window_rows.device)
    return torch.stack([rows < sequence.plan.n_appended for sequence in job.sequences])


def _padded_batch_compressor(
    pipeline, model, adapter, input_ids, mask, question_span, cache, target, memos=None
) -> PaddedBatchCompressor:
    """One compressor per sequence, planned on its unpadded ids, behind one hook; ``memos``: one score memo
    per sequence (pipelines sharing a window and scorer)."""
    batch, length = input_ids.shape
    spans = [None] * batch if question_span is None else list(question_span)
    if len(spans) != batch or not all(span is None or isinstance(span, tuple) for span in spans):
        raise UnsupportedInputError(
            f"a padded batch of {batch} sequences needs question_span as a list of {batch} (start, end) tuples "
            "or None, each in its own sequence's positions (without the padding)"
        )
    if pipeline.allocator.model_wide:
        raise UnsupportedInputError(
            f"the {pipeline.allocator.name!r} allocator ranks every layer of a sequence together, which a left-padded "
            "batch does not support: prefill these sequences one at a time (batch 1)"
        )
    pads = (length - mask.sum(dim=1)).tolist()
    memos = memos or [None] * batch
    sequences = [
        make_compressor(pipeline, model, adapter, input_ids[b : b + 1, pad:], spans[b], cache, target=None,
                         scores_memo=memos[b], sequence=b)
        for b, pad in enumerate(pads)
    ]
    appended = max(job.plan.n_appended for job in sequences)
    plan = WindowPlan(
        length, torch.zeros(0, dtype=torch.long, device=input_ids.device),
        *(_appended_rows_padded([job.plan for job in sequences], appended) if appended else (None, None)),
    )
    report = CompressionReport(
        pipeline.name, length, [job.report.budget for job in sequences],
        uncompressed_layers=sequences[0].report.uncompressed_layers,
        sequence_lengths=[length - pad for pad in pads],
    )
    return PaddedBatchCompressor(
        plan=plan, target=target, scorer=pipeline.scorer, selector=pipeline.selector, allocator=pipeline.allocator,
        budgets={i: [job.budgets[i] for job in sequences] for i in sequences[0].budgets},
        report=report, pipeline=pipeline, rope_at=adapter.rope_at, sequences=sequences, pads=pads,
    )


def _appended_rows_padded(plans: list[WindowPlan], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's appended ids and positions ``[batch, rows]``, shorter ones padded at the end.

    The padding rows come after every row a sequence uses and are masked out of the forward, so they
    change nothing.
    """
    def padded(tensor: torch.Tensor | None, fill: torch.Tensor) -> torch.Tensor:
        have = 0 if tensor is None else tensor.shape[1]
        tail = fill.expand(1, rows - have)
        return tail if tensor is None else torch.cat([tensor, tail], dim=1)

    zero = torch.zeros(1, 1, dtype=torch.long, device=plans[0].window_rows.device)
    ids = torch.cat([padded(plan.appended_ids, zero) for plan in plans])
    positions = torch.cat([
        padded(plan.appended_positions, zero if plan.appended_positions is None else plan.appended_positions[:, -1:])
        for plan in plans
    ])
    return ids, positions


def make_compressor(
    pipeline, model, adapter: ModelAdapter, input_ids, question_span, cache, target, scores_memo=None, sequence=0
):
    plan = pipeline.window.plan(input_ids, question_span)
    budget = pipeline.budget.resolve(plan.prompt_length)
    compressible = adapter.compressible_layers()
    if not compressible:
        raise UnsupportedModelError(
            f"every attention layer of this {type(model).__name__} uses a sliding window "
            f"(sliding_window={getattr(model.config, 'sliding_window', None)}); kvpress_like compresses "
            "full-attention layers only. If your prompts are shorter than the window, load the model with "
            "sliding_window=None"
        )
    layer_budgets = pipeline.allocator.layer_budgets(len(compressible), plan.prompt_length, budget)
    report = CompressionReport(
        pipeline.name, plan.prompt_length, budget,
        uncompressed_layers=[i for i in range(len(cache.layers)) if i not in compressible],
    )
    return LayerCompressor(
        plan=plan,
        target=target,
        scorer=pipeline.scorer,
        selector=pipeline.selector,
        allocator=pipeline.allocator,
        budgets=dict(zip(compressible, layer_budgets, strict=True)),
        report=report,
        pipeline=pipeline,
        rope_at=adapter.rope_at,
        keep_hidden_states=getattr(pipeline.scorer, "reads_hidden_states", False),
        scores_memo=scores_memo,
        sequence=sequence,
    )


def shallow_copy(cache: CompressedCache) -> CompressedCache:
    """A cache sharing the tensors of ``cache``; updates to either never affect the other.

    Every layer type rebinds its tensors on update instead of writing into them, so copying the layer
    objects is enough: reuse one compressed cache for several questions by copying it first.
    """
    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    twin.evicted = dict(cache.evicted)
    twin.added_valid = dict(cache.added_valid)
    return twin


def forward(
    model, cache, input_ids: torch.Tensor, positions: torch.Tensor, logits_row: int = -1,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``input_ids`` at ``positions`` (``[n]`` or ``[batch, n]``) into ``cache``; one row's logits (last).

    ``attention_mask`` is the 2-D mask over every token so far (logical positions), when there is padding.
    """
    positions = positions[None] if positions.dim() == 1 else positions
    rows = 1 if logits_row == -1 else torch.tensor([logits_row], device=input_ids.device)
    inputs = {"input_ids": input_ids, "position_ids": positions, "logits_to_keep": rows}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.long()
    out = model(**model_inputs(model, cache, **inputs))
    return out.logits[:, -1]


def feed(
    model, cache: CompressedCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Append ``input_ids`` ``[batch, n]`` to a cache; return the last row's logits ``[batch, vocab]``.

    Positions continue each sequence from the tokens the cache has seen (its logical length, or its own
    number of real tokens in a padded batch). ``attention_mask`` ``[batch, n]`` marks left padding of the
    new rows (sequences of a batch whose continuations differ in length); the cache remembers it.
    """
    batch, length = input_ids.shape
    new = torch.ones(batch, length, dtype=torch.bool, device=model.device)
    if attention_mask is not None:
        check_inputs(input_ids, attention_mask)
        new = attention_mask.to(model.device).bool()
    seen = cache.token_mask
    if seen is None and (attention_mask is None or bool(new.all())):
        first = cache.get_seq_length()
        positions = torch.arange(first, first + length, device=model.device).expand(batch, length)
        mask = None
    else:
        if seen is None:
            seen = torch.ones(batch, cache.get_seq_length(), dtype=torch.bool, device=model.device)
        positions = seen.sum(dim=1, keepdim=True) + new.long().cumsum(dim=1) - 1
        mask = cache.token_mask = torch.cat([seen, new], dim=1)
    if getattr(cache, "decoding", None) is not None:
        cache.decoding.note_ids(input_ids)
    with compressed_attention(model, cache):
        return forward(model, cache, input_ids.to(model.device), positions.clamp(min=0), attention_mask=mask)


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive number of tokens or None (no chunking), got {chunk_size!r}")


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
        mask = attention_mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise UnsupportedInputError(f"rows {(~mask.any(dim=1)).nonzero().flatten().tolist()} of attention_mask "
                                        "are all padding: every sequence needs at least one token")
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise UnsupportedInputError(
                "attention_mask has padding after a token: pad on the left (tokenizer.padding_side = 'left', "
                "the transformers convention for generation), so every sequence ends at the last column"
            )
