"""Evaluate one sample under one protocol with any number of (method, budget) candidates.

Cost model (CPU, small model): the prompt forward dominates, so it is paid once per sample and
protocol (:func:`kvpress_like.prefill.prefill_many`) and shared by the full-cache reference and every
candidate. Then, per group of candidates whose compressed caches have identical shapes (the same
budget under uniform allocation), one batched forward feeds the full-cache answer (teacher forcing)
and gives the next-token distributions along it. A candidate whose greedy choice agrees with the
full-cache answer at every step provably produces that answer; only the others are decoded (batched).

Per candidate the row holds: the answer and its correctness, token match rate with the full-cache
answer, mean KL(full ‖ method) along it, attention recall per layer (share of the true decoding
queries' attention mass on kept tokens) and attention similarity per layer (cosine of the window's
attention with the true decoding attention; a property of the window, equal across budgets).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpress_like.cache import CompressedCache
from kvpress_like.errors import ConfigError
from kvpress_like.eval import metrics
from kvpress_like.eval.capture import QueryCapture
from kvpress_like.eval.protocols import (
    check_protocol,
    greedy,
    logits_along,
    prepare,
    select_rows,
    signature,
    stack,
)
from kvpress_like.eval.records import FULL
from kvpress_like.factory import build
from kvpress_like.pipeline import Pipeline, eos_ids, left_padded
from kvpress_like.prefill import PrefillResult, prefill_many, shallow_copy
from kvpress_like.scorers.attention import window_attention
from kvpress_like.unbatch import split_batch

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One cell of an ablation: a label for the method configuration, the budget as written, the pipeline."""

    label: str
    budget: str
    pipeline: Pipeline


@dataclass
class SampleResult:
    """The reference and the candidates' rows for one question; ``followups``: the sample's other questions."""

    reference: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    followups: list[SampleResult] = field(default_factory=list)


@dataclass
class Context:
    """One compressed context and what its questions are answered from: the full-cache reference's prefill, the
    candidates that prefilled (with their results), every candidate, the errors of those that did not, and the
    windows' recorded attention (for attention similarity)."""

    reference: PrefillResult
    prefilled: list[tuple[Candidate, PrefillResult]]
    candidates: list[Candidate]
    errors: dict[int, str | None]
    windows: dict[str, dict[int, torch.Tensor]]


@dataclass
class Question:
    """One question of a sample, as the model is asked it: its prompt (the compressed part first), the rows fed
    after the compressed part, and the cap on the answer's tokens and its end tokens."""

    sample: Any
    prompt: Any
    rest: torch.Tensor
    max_new: int
    eos: set[int]

    @property
    def compressed(self) -> int:
        return self.prompt.compress_length

    @property
    def total(self) -> int:
        return self.prompt.length


@dataclass
class ReferenceAnswer:
    """The full-cache answer's tokens and the reference's next-token logits along it (``[n, V]``)."""

    tokens: list[int]
    logits: torch.Tensor


def reference_pipeline() -> Pipeline:
    """The full-cache reference: the built-in ``full`` method (it keeps every token and takes no budget)."""
    return build(FULL)


MAX_RECORDED_WINDOW = 256  # larger windows (H2O's whole prompt) would cost an L x L attention: not recorded


class _WindowRecorder:
    """Wraps a candidate's scorer for one sample to record the window's attention (for attention similarity).

    Once per window configuration, sequence of the batch and layer, the window's mean attention over the
    prompt (``[kv_heads, group, L]``) is recorded (windows of at most ``MAX_RECORDED_WINDOW`` queries). Scores
    are shared across candidates that differ only in their budget by :func:`prefill_many` itself.
    """

    def __init__(self, inner, windows: dict, window_key: str):
        self._inner, self._windows, self._window_key = inner, windows, window_key

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def score(self, ctx):
        rows = range(ctx.queries.shape[0])  # a batch without padding is scored whole, a padded one per sequence
        if 0 < ctx.queries.shape[2] <= MAX_RECORDED_WINDOW and any(
            ctx.layer_idx not in self._windows.get((self._window_key, ctx.sequence + row), {}) for row in rows
        ):
            attention = window_attention(ctx).mean(dim=3)  # [batch, kv_heads, group, L]
            for row in rows:
                self._windows.setdefault((self._window_key, ctx.sequence + row), {})[ctx.layer_idx] = attention[row]
        return self._inner.score(ctx)


def _window_key(pipeline: Pipeline) -> str:
    return f"{pipeline.window.name}:{pipeline.window.config.model_dump_json()}"


def preflight(model, pipeline: Pipeline, ids: torch.Tensor, span) -> str | None:
    """Catch, before the shared forward, a configuration that cannot run on this prompt; returns the error."""
    try:
        plan = pipeline.window.plan(ids, span)
        budget = pipeline.budget.resolve(plan.prompt_length)
        layers = sum(1 for layer in CompressedCache(model.config).layers if not getattr(layer, "is_sliding", False))
        smallest = min(pipeline.allocator.layer_budgets(layers, plan.prompt_length, budget))
        if smallest < plan.prompt_length:
            pipeline.selector.select(torch.rand(1, 1, plan.prompt_length), smallest)
    except Exception as error:  # any part may refuse a prompt; the cell records why
        return f"{type(error).__name__}: {error}"
    return None


@torch.no_grad()
def evaluate_sample(model, tokenizer, sample, protocol: str, candidates: list[Candidate], **options) -> SampleResult:
    """Run the reference and every candidate on ``sample`` under ``protocol``; one row per candidate.

    A sample with several questions (:meth:`~kvpress_like.eval.tasks.Sample.questions`) gets one result per
    question, the first returned and the others in its ``followups``. Query-agnostic, the context is
    compressed once and every question is answered from copies of the same compressed caches (the reuse
    scenario); question-aware, each question needs its own compression and is evaluated on its own.
    Options: ``answer_prefix``, ``max_new_tokens``, ``attention_metrics``, ``batch`` (candidates with
    equal cache shapes decode together).
    """
    return evaluate_batch(model, tokenizer, [sample], protocol, candidates, **options)[0]


@torch.no_grad()
def evaluate_batch(
    model,
    tokenizer,
    samples: list,
    protocol: str,
    candidates: list[Candidate],
    *,
    answer_prefix: bool = True,
    max_new_tokens: int | None = None,
    attention_metrics: bool = True,
    batch: bool = True,
    prompt_chunk: int | None = None,
    interim_factor: float = 1.0,
) -> list[SampleResult]:
    """:func:`evaluate_sample` for several samples whose prompts share one left-padded prompt forward.

    Each sequence of the batch is compressed as if alone and split off (:func:`~kvpress_like.unbatch.split_batch`)
    before it is answered, so every result equals :func:`evaluate_sample` on that sample (timing aside: each
    result's ``seconds`` counts an equal share of the batch's prefill). If a candidate cannot run on one
    of the prompts, the samples run one at a time, so that the error lands on that sample only.
    ``prompt_chunk``: every candidate runs a progressive prefill (:mod:`kvpress_like.progressive`), one
    pipeline and one sample at a time (the reference stays a plain prefill), keeping ``interim_factor`` × the
    budget between chunks.
    """
    options = dict(answer_prefix=answer_prefix, max_new_tokens=max_new_tokens,
                   attention_metrics=attention_metrics, batch=batch, prompt_chunk=prompt_chunk,
                   interim_factor=interim_factor)
    if protocol == "question_aware":  # each question compresses its own prompt
        contexts = [[question] for sample in samples for question in sample.questions()]
    else:  # the questions of a sample share its compressed context
        contexts = [sample.questions() for sample in samples]
    answered = iter(_evaluate_contexts(model, tokenizer, contexts, protocol, candidates, options))
    results = []
    for sample in samples:
        if protocol == "question_aware":
            first, *others = [next(answered)[0] for _ in sample.questions()]
        else:
            first, *others = next(answered)
        first.followups = others
        results.append(first)
    return results


def _evaluate_contexts(model, tokenizer, contexts, protocol, candidates, options) -> list[list[SampleResult]]:
    """Per compressed context (a list of questions sharing it): one result per question."""
    check_protocol(protocol)
    if len(contexts) > 1 and options["prompt_chunk"]:  # progressive prefills share no forward
        return [_evaluate_contexts(model, tokenizer, [c], protocol, candidates, options)[0] for c in contexts]
    started = time.perf_counter()
    prompts = [[prepare(tokenizer, q, protocol, options["answer_prefix"]) for q in questions] for questions in contexts]
    heads = [_shared_head(model, questions[0], group) for questions, group in zip(contexts, prompts, strict=True)]
    spans = [group[0].question_span for group in prompts]
    errors = [{id(c): preflight(model, c.pipeline, head, span) for c in candidates}
              for head, span in zip(heads, spans, strict=True)]
    windows: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    if len(contexts) > 1:
        if any(error is not None for found in errors for error in found.values()):
            return [_evaluate_contexts(model, tokenizer, [c], protocol, candidates, options)[0] for c in contexts]
        per_context = _prefill_batch(model, heads, candidates, spans, windows if options["attention_metrics"] else None)
        if per_context is None:  # the shared forward failed: one at a time, so each error lands on its sample
            return [_evaluate_contexts(model, tokenizer, [c], protocol, candidates, options)[0] for c in contexts]
        runnable = candidates
    else:
        runnable = [c for c in candidates if errors[0][id(c)] is None]
        per_context = [_prefill(model, heads[0], [reference_pipeline()] + [c.pipeline for c in runnable], spans[0],
                                windows if options["attention_metrics"] else None, errors[0], runnable,
                                options["prompt_chunk"], options["interim_factor"])]
    prefill_share = (time.perf_counter() - started) / len(contexts)
    out = []
    for b, (questions, group, results) in enumerate(zip(contexts, prompts, per_context, strict=True)):
        started = time.perf_counter()
        pairs = [(c, r) for c, r in zip(runnable, results[1:], strict=True) if r is not None]
        own_windows = {key: layers for (key, row), layers in windows.items() if row == b}
        context = Context(results[0], pairs, candidates, errors[b], own_windows)
        answers = [
            _answer(model, tokenizer, _question(model, tokenizer, sample, prompt, options), context, options)
            for sample, prompt in zip(questions, group, strict=True)
        ]
        for answer in answers:
            answer.reference["timing"] = {"prefill_all": round(prefill_share, 3), **answer.reference["timing"]}
            if len(contexts) > 1:
                answer.reference["timing"]["prefill_batch"] = len(contexts)
        answers[0].seconds = prefill_share + time.perf_counter() - started
        out.append(answers)
    return out


def _shared_head(model, sample, prompts) -> torch.Tensor:
    """The compressed part ``[1, C]`` of a context's prompts, which every question must share."""
    compressed = prompts[0].compress_length
    head = prompts[0].input_ids[:, :compressed].to(model.device)
    if any(not torch.equal(p.input_ids[:, :compressed].to(model.device), head) for p in prompts[1:]):
        raise ConfigError(f"the questions of sample {sample.task!r} do not share the compressed context")
    return head


def _prefill_batch(model, heads, candidates, spans, windows) -> list[list[PrefillResult]] | None:
    """One left-padded :func:`prefill_many` of every context (reference first), split per context;
    ``None`` if the shared forward failed."""
    pipelines = [reference_pipeline()] + [c.pipeline for c in candidates]
    ids, mask = left_padded([head[0] for head in heads])
    try:
        with _recording(pipelines[1:], windows):
            batched = prefill_many(model, ids, pipelines, attention_mask=mask, question_span=spans)
    except Exception as error:  # one bad configuration must not sink the whole batch
        log.warning("batched prefill failed (%s); running the %d samples one by one", error, len(heads))
        return None
    split = [split_batch(model, result) for result in batched]
    return [[results[b] for results in split] for b in range(len(heads))]


def _question(model, tokenizer, sample, prompt, options) -> Question:
    ids = prompt.input_ids.to(model.device)
    return Question(sample, prompt, ids[:, prompt.compress_length:], options["max_new_tokens"] or sample.max_new_tokens,
                    eos_ids(model, tokenizer))


def _answer(model, tokenizer, question: Question, context: Context, options) -> SampleResult:
    """One question answered from (copies of) the compressed caches: the reference, then every candidate."""
    started = time.perf_counter()
    sample, ref, compressed, rest = question.sample, context.reference, question.compressed, question.rest
    attention_metrics = options["attention_metrics"]

    # The full-cache reference: rows after the compressed part, greedy answer, teacher-forced replay.
    capture = QueryCapture(model, prefix=compressed) if attention_metrics else None
    ref_cache = shallow_copy(ref.cache)
    with capture or nullcontext():
        logits0 = logits_along(model, ref_cache, rest, compressed)[:, -1] if rest.shape[1] else ref.next_token_logits
        if capture:
            capture.enabled = False
        (answer,) = greedy(model, shallow_copy(ref_cache), logits0, question.max_new, question.eos)
        if capture:
            capture.enabled = True
        replay = logits_along(model, shallow_copy(ref_cache), torch.tensor([answer], device=model.device),
                              question.total)
    reference = ReferenceAnswer(answer, torch.cat([logits0[:, None], replay[:, :-1]], dim=1)[0])
    ref_text = tokenizer.decode(answer, skip_special_tokens=True)
    timing = {"reference": time.perf_counter() - started}
    out = SampleResult(
        reference={
            "answer": ref_text, "correct": sample.is_correct(ref_text), "score": sample.score(ref_text),
            "answer_tokens": len(answer), "prompt_tokens": question.total, "compressed_tokens": compressed,
            "prefill_seconds": ref.report.prefill_seconds,
        }
    )
    true_mass = {layer: m[0] for layer, m in capture.mass.items()} if capture else {}
    similarity = {key: _similarity(layers, true_mass) for key, layers in context.windows.items()}

    # Candidates, grouped by cache shape so that each group runs batched.
    by_candidate: dict[int, dict[str, Any]] = {}
    for group in _groups(context.prefilled, options["batch"]):
        by_candidate.update(_run_group(model, tokenizer, question, reference, group))
    timing["candidates"] = time.perf_counter() - started - timing["reference"]
    out.reference["timing"] = {k: round(v, 3) for k, v in timing.items()}
    for candidate in context.candidates:
        row = {"label": candidate.label, "method": candidate.pipeline.method, "budget": candidate.budget}
        if id(candidate) in by_candidate:
            result = next(r for c, r in context.prefilled if c is candidate)
            row.update(by_candidate[id(candidate)])
            row.update(_report_fields(result.report))
            if attention_metrics:
                row.update(_recall_fields(result.report, true_mass, compressed))
                layers_sim = similarity.get(_window_key(candidate.pipeline), {})
                row["similarity_layers"] = (
                    [_round(layers_sim.get(i)) for i in sorted(true_mass)] if layers_sim else None
                )
                row["similarity"] = _mean(list(layers_sim.values())) if layers_sim else None
            row["error"] = None
        else:
            row["error"] = context.errors.get(id(candidate)) or "prefill failed"
        out.rows.append(row)
    out.seconds = time.perf_counter() - started
    return out


def _prefill(model, head, pipelines, span, windows, errors, runnable, prompt_chunk=None, interim_factor=1.0):
    """``prefill_many`` with window recording; if the shared run fails, each pipeline runs on its own (always,
    with ``prompt_chunk``: progressive prefills share no forward)."""
    with _recording(pipelines[1:], windows):
        if prompt_chunk is None:
            try:
                return prefill_many(model, head, pipelines, question_span=span)
            except Exception as error:  # one bad configuration must not sink the whole cell
                log.warning("shared prefill failed (%s); running the %d pipelines one by one", error, len(pipelines))
        results = prefill_many(model, head, pipelines[:1], question_span=span)
        for candidate, pipeline in zip(runnable, pipelines[1:], strict=True):
            try:
                results.append(pipeline.prefill(model, head, question_span=span, prompt_chunk=prompt_chunk,
                                                interim_factor=interim_factor))
            except Exception as error:
                errors[id(candidate)] = f"{type(error).__name__}: {error}"
                results.append(None)
        return results


@contextmanager
def _recording(pipelines, windows):
    """Wrap each pipeline's scorer in a :class:`_WindowRecorder` (``windows`` not ``None``); put them back after."""
    wrapped = []
    for pipeline in pipelines if windows is not None else []:
        wrapped.append((pipeline, pipeline.scorer))
        pipeline.scorer = _WindowRecorder(pipeline.scorer, windows, _window_key(pipeline))
    try:
        yield
    finally:
        for pipeline, scorer in wrapped:
            pipeline.scorer = scorer


def _similarity(window_layers: dict[int, torch.Tensor], true_mass: dict[int, torch.Tensor]) -> dict[int, float]:
    return {
        layer: metrics.attention_similarity(attn, true_mass[layer])
        for layer, attn in window_layers.items()
        if layer in true_mass and attn.shape == true_mass[layer].shape
    }


def _groups(pairs, batch: bool):
    if not batch:
        return [[p] for p in pairs]
    groups: dict[Any, list] = {}
    for index, (candidate, result) in enumerate(pairs):
        key = signature(result.cache)
        groups.setdefault(key if key is not None else ("single", index), []).append((candidate, result))
    return list(groups.values())


def _run_group(model, tokenizer, question: Question, reference: ReferenceAnswer, group) -> dict[int, dict[str, Any]]:
    """The rows of a group of candidates whose caches share one shape, run as one batch (keyed by candidate id)."""
    caches = [shallow_copy(result.cache) for _, result in group]
    cache = stack(model, caches) if len(group) > 1 else caches[0]
    size, rest, answer = len(group), question.rest, reference.tokens
    if rest.shape[1]:
        first = logits_along(model, cache, rest.expand(size, -1), question.compressed)[:, -1]
    else:
        first = torch.cat([r.next_token_logits for _, r in group], dim=0)
    answer_ids = torch.tensor([answer], device=model.device)
    if len(answer) > 1:
        replay = logits_along(model, shallow_copy(cache), answer_ids[:, :-1].expand(size, -1), question.total)
        along = torch.cat([first[:, None], replay], dim=1)
    else:
        along = first[:, None]
    kl = metrics.kl_divergence(reference.logits[None].expand_as(along), along)  # [size, n]
    agrees = (along.argmax(-1) == answer_ids).all(-1)
    answers: list[list[int] | None] = [list(answer) if bool(a) else None for a in agrees]
    diverged = [i for i, a in enumerate(answers) if a is None]
    if diverged:
        decoded = greedy(model, select_rows(model, cache, diverged) if size > 1 else shallow_copy(cache),
                         first[diverged], question.max_new, question.eos)
        for i, tokens in zip(diverged, decoded, strict=True):
            answers[i] = tokens
    out = {}
    for i, (candidate, _) in enumerate(group):
        text = tokenizer.decode(answers[i], skip_special_tokens=True)
        out[id(candidate)] = {
            "answer": text,
            "correct": question.sample.is_correct(text),
            "score": question.sample.score(text),
            "token_match": metrics.token_match_rate(answers[i], answer),
            "kl": float(kl[i].mean()),
            "kl_max": float(kl[i].max()),
            "batch_size": size,
        }
    return out


def _report_fields(report) -> dict[str, Any]:
    return {
        "budget_tokens": report.budget,
        "cache_bytes": report.cache_bytes_after,
        "cache_fraction": report.cache_bytes_after / report.cache_bytes_before if report.cache_bytes_before else None,
        "compress_seconds": report.seconds,
    }


def _recall_fields(report, true_mass: dict[int, torch.Tensor], compressed: int) -> dict[str, Any]:
    layers = []
    for layer in sorted(true_mass):
        if layer in report.layers:
            mask = report.layers[layer].kept_mask(compressed)[0]
            layers.append(metrics.attention_recall(true_mass[layer], mask))
        else:
            layers.append(1.0)  # a layer left uncompressed keeps everything
    return {"recall_layers": [round(v, 5) for v in layers], "recall": _mean(layers)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None

