"""The pipeline: one method's parts, applied to a prefill and to generation."""

from __future__ import annotations

from typing import Any

import torch

from kvpress_like.budget import Budget
from kvpress_like.decode_compression import DecodeCompressor
from kvpress_like.decode_schedule import DecodingConfig
from kvpress_like.decoding import decode_batch, parse_generation_options
from kvpress_like.errors import ConfigError, UnsupportedInputError
from kvpress_like.parts import Allocator, Scorer, Selector, WindowBuilder
from kvpress_like.prefill import PrefillResult, compressed_prefill, feed, is_padded
from kvpress_like.progressive import progressive_prefill
from kvpress_like.prompting import build_prompt


class Pipeline:
    """A compression method ready to run: window builder → scorer → allocator → selector → cache."""

    def __init__(
        self,
        method: str | None,
        budget: Budget,
        window: WindowBuilder,
        scorer: Scorer,
        allocator: Allocator,
        selector: Selector,
        decoding: DecodingConfig | None = None,
    ):
        self.method, self.budget = method, budget
        self.window, self.scorer, self.allocator, self.selector = window, scorer, allocator, selector
        if selector.decides_counts and allocator.model_wide:
            raise ConfigError(f"the {selector.name!r} selector decides each head's count itself; the "
                              f"{allocator.name!r} "
                              "allocator shares budgets across layers: choose a per-layer allocator (full, uniform)")
        self.decoding = None if decoding is None else _checked_decoding(decoding.resolved(window), scorer, selector)
        self.last_report = None

    @property
    def name(self) -> str:
        """The registered method this pipeline was built from, or ``custom`` for a spec without one."""
        return self.method or "custom"

    @property
    def config(self) -> dict[str, Any]:
        """The fully resolved configuration; ``build_from_spec(pipeline.config)`` rebuilds this pipeline."""
        config: dict[str, Any] = {} if self.method is None else {"method": self.method}
        if self.allocator.uses_budget:
            config["budget"] = self.budget.model_dump(exclude_none=True)
        parts = {p.kind: {"name": p.name, **p.config.model_dump()} for p in self.parts}
        if self.decoding is not None:
            parts["decoding"] = self.decoding.model_dump(exclude_none=True)
        return {**config, **parts}

    @property
    def parts(self) -> tuple:
        return (self.window, self.scorer, self.allocator, self.selector)

    def __repr__(self) -> str:
        decoding = "" if self.decoding is None else f", decoding={self.decoding.model_dump(exclude_none=True)}"
        return f"Pipeline({self.name!r}, budget={self.budget}, parts={list(self.parts)}{decoding})"

    def prefill(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        question_span: tuple[int, int] | None = None,
        chunk_size: int | None = None,
        prompt_chunk: int | None = None,
        interim_factor: float = 1.0,
    ) -> PrefillResult:
        """Prefill ``input_ids`` ``[batch, L]`` and compress the cache in the same forward; logits of position L−1.

        ``chunk_size`` runs each layer's MLP on that many rows at a time (bounded activations; the same
        tokens are kept, see :func:`kvpress_like.prefill.compressed_prefill`). ``prompt_chunk`` feeds the
        prompt that many tokens at a time and compresses after each chunk (memory bounded by the budget and
        the chunk, not the prompt; the streaming variant of the method, see :mod:`kvpress_like.progressive`), whose
        intermediate rounds keep ``interim_factor`` × the budget.
        """
        if prompt_chunk is None and interim_factor != 1.0:
            raise ConfigError("interim_factor applies to a progressive prefill: give prompt_chunk too")
        if prompt_chunk is not None:
            if attention_mask is not None:
                raise UnsupportedInputError("a progressive prefill (prompt_chunk) takes one unpadded batch; "
                                            "prefill padded batches without prompt_chunk")
            result = progressive_prefill(model, input_ids, self, prompt_chunk, question_span, chunk_size,
                                         interim_factor)
        else:
            result = compressed_prefill(model, input_ids, self, attention_mask, question_span, chunk_size)
        if self.decoding is not None:
            compressor = DecodeCompressor(model, self, self.decoding, result.report, input_ids,
                                          is_padded(attention_mask))
            result.cache.decoding, result.cache.own_masks = compressor, True
            result.report.decoding = compressor.report
        self.last_report = result.report
        return result

    @torch.no_grad()
    def generate(
        self,
        model,
        tokenizer,
        context: str | list[str],
        question: str | list[str] | None = None,
        question_aware: bool = True,
        max_new_tokens: int = 32,
        chunk_size: int | None = None,
        prompt_chunk: int | None = None,
        interim_factor: float = 1.0,
        **generation_kwargs: Any,
    ) -> str | list[str]:
        """Compress and answer; the report of the compression is left in ``self.last_report``.

        Question-aware: the question is inside the compressed prompt (DapQ's protocol). Query-agnostic:
        only the context is compressed and the question is fed after it (kvpress's protocol).
        A list of contexts (and of questions) runs as one left-padded batch, each sequence compressed and
        answered as if alone; the answers come back as a list. ``chunk_size``, ``prompt_chunk`` and
        ``interim_factor`` chunk the prefill (see :meth:`prefill`). With a decode schedule (``build(...,
        decoding=...)``) the cache is also compressed while the answer is generated. Options: ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_at_eos``.
        """
        options = parse_generation_options(generation_kwargs)
        contexts, questions = _as_batch(context, question)
        prompts = [build_prompt(tokenizer, c, q) for c, q in zip(contexts, questions, strict=True)]
        if questions[0] is None or question_aware:
            ids, mask = left_padded([p.input_ids[0] for p in prompts])
            spans = [p.question_span for p in prompts]
            result = self.prefill(model, ids, mask if len(prompts) > 1 else None,
                                  question_span=spans if len(prompts) > 1 else spans[0], chunk_size=chunk_size,
                                  prompt_chunk=prompt_chunk, interim_factor=interim_factor)
            logits = result.next_token_logits
        else:
            ids, mask = left_padded([p.input_ids[0, : p.context_length] for p in prompts])
            result = self.prefill(model, ids, mask if len(prompts) > 1 else None, chunk_size=chunk_size,
                                  prompt_chunk=prompt_chunk, interim_factor=interim_factor)
            rest, rest_mask = left_padded([p.input_ids[0, p.context_length :] for p in prompts])
            logits = feed(model, result.cache, rest.to(model.device), attention_mask=rest_mask)
        answers = decode_batch(model, result.cache, logits, max_new_tokens, options, eos_ids(model, tokenizer))
        texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in answers]
        return texts if isinstance(context, list) else texts[0]


def _checked_decoding(decoding: DecodingConfig, scorer: Scorer, selector: Selector) -> DecodingConfig:
    """Refuse a decode schedule the method's parts cannot run."""
    if selector.decides_counts:
        raise ConfigError(f"the {selector.name!r} selector is not built for decode-time events yet: build this "
                          "method without decoding, or use a top-k selector with a target or ratio")
    if scorer.reads_hidden_states:
        raise ConfigError(f"the {scorer.name!r} scorer reads the prompt's hidden states, which a decode-time event "
                          "does not have: build this method without decoding, or choose another scorer")
    if decoding.target is not None:  # a ratio's target is checked at each event
        selector.checked_protected_mask(decoding.target + decoding.interval, decoding.target, torch.device("cpu"))
    return decoding


def _as_batch(context, question) -> tuple[list[str], list[str | None]]:
    """Contexts and questions as equal-length lists (one question may serve every context)."""
    if not isinstance(context, list):
        if isinstance(question, list):
            raise UnsupportedInputError("a list of questions needs a list of contexts of the same length")
        return [context], [question]
    if not context:
        raise UnsupportedInputError("the list of contexts is empty")
    questions = question if isinstance(question, list) else [question] * len(context)
    if len(questions) != len(context):
        raise UnsupportedInputError(f"{len(context)} contexts but {len(questions)} questions: give one per context")
    if len({q is None for q in questions}) > 1:
        raise UnsupportedInputError("give a question for every context, or for none")
    return context, questions


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as ``[batch, longest]`` ids and attention mask, padded on the left."""
    longest = max(row.shape[0] for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, row in enumerate(rows):
        if row.shape[0]:
            ids[b, longest - row.shape[0] :], mask[b, longest - row.shape[0] :] = row, 1
    return ids, mask


def eos_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id the model's generation config or the tokenizer declares."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}
