"""The pipeline: one method's parts, applied to a prefill and to generation."""

from __future__ import annotations

from typing import Any

import torch

from kvpress_like.budget import Budget
from kvpress_like.decoding import decode, parse_generation_options
from kvpress_like.parts import Allocator, Scorer, Selector, WindowBuilder
from kvpress_like.prefill import PrefillResult, compressed_prefill, feed
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
    ):
        self.method, self.budget = method, budget
        self.window, self.scorer, self.allocator, self.selector = window, scorer, allocator, selector
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
        return {**config, **parts}

    @property
    def parts(self) -> tuple:
        return (self.window, self.scorer, self.allocator, self.selector)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, budget={self.budget}, parts={list(self.parts)})"

    def prefill(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        question_span: tuple[int, int] | None = None,
        chunk_size: int | None = None,
    ) -> PrefillResult:
        """Prefill ``input_ids`` ``[batch, L]`` and compress the cache in the same forward; logits of position L−1.

        ``chunk_size`` runs each layer's MLP on that many rows at a time (bounded activations; the same
        tokens are kept, see :func:`kvpress_like.prefill.compressed_prefill`).
        """
        result = compressed_prefill(model, input_ids, self, attention_mask, question_span, chunk_size)
        self.last_report = result.report
        return result

    @torch.no_grad()
    def generate(
        self,
        model,
        tokenizer,
        context: str,
        question: str | None = None,
        question_aware: bool = True,
        max_new_tokens: int = 32,
        chunk_size: int | None = None,
        **generation_kwargs: Any,
    ) -> str:
        """Compress and answer; the report of the compression is left in ``self.last_report``.

        Question-aware: the question is inside the compressed prompt (DapQ's protocol). Query-agnostic:
        only the context is compressed and the question is fed after it (kvpress's protocol).
        ``chunk_size`` chunks the prefill (see :meth:`prefill`).
        Options: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_at_eos``.
        """
        options = parse_generation_options(generation_kwargs)
        prompt = build_prompt(tokenizer, context, question)
        ids = prompt.input_ids
        if question is None or question_aware:
            result = self.prefill(model, ids, question_span=prompt.question_span, chunk_size=chunk_size)
            logits = result.next_token_logits
        else:
            result = self.prefill(model, ids[:, : prompt.context_length], chunk_size=chunk_size)
            logits = feed(model, result.cache, ids[:, prompt.context_length :].to(model.device), prompt.context_length)
        tokens = decode(model, result.cache, logits, ids.shape[1], max_new_tokens, options, eos_ids(model, tokenizer))
        return tokenizer.decode(tokens, skip_special_tokens=True)


def eos_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id the model's generation config or the tokenizer declares."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}
