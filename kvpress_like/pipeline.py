"""The pipeline: one method's parts, applied to a prefill and to generation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from kvpress_like.adapters import get_adapter
from kvpress_like.budget import Budget
from kvpress_like.cache import CompressedCache
from kvpress_like.compat import model_inputs
from kvpress_like.compressor import LayerCompressor
from kvpress_like.decoding import decode, parse_generation_options
from kvpress_like.errors import UnsupportedInputError
from kvpress_like.parts import Allocator, Scorer, Selector, WindowBuilder, WindowPlan
from kvpress_like.plugins import get_plugin_manager
from kvpress_like.prompting import build_prompt
from kvpress_like.report import CompressionReport


@dataclass
class PrefillResult:
    """A compressed prefill: the cache, the logits of prompt position L−1, and the report."""

    cache: CompressedCache
    next_token_logits: torch.Tensor
    report: CompressionReport


class Pipeline:
    """A compression method ready to run: window builder → scorer → allocator → selector → cache."""

    def __init__(
        self,
        method: str,
        budget: Budget,
        window: WindowBuilder,
        scorer: Scorer,
        allocator: Allocator,
        selector: Selector,
    ):
        self.method, self.budget = method, budget
        self.window, self.scorer, self.allocator, self.selector = window, scorer, allocator, selector

    @property
    def config(self) -> dict[str, Any]:
        """The fully resolved configuration; ``build_from_spec(pipeline.config)`` rebuilds this pipeline."""
        parts = {p.kind: {"name": p.name, **p.config.model_dump()} for p in self.parts}
        return {"method": self.method, "budget": self.budget.model_dump(exclude_none=True), **parts}

    @property
    def parts(self) -> tuple:
        return (self.window, self.scorer, self.allocator, self.selector)

    def __repr__(self) -> str:
        return f"Pipeline({self.method!r}, budget={self.budget}, parts={list(self.parts)})"

    @torch.no_grad()
    def prefill(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        question_span: tuple[int, int] | None = None,
    ) -> PrefillResult:
        """Prefill ``input_ids`` ``[batch, L]`` and compress the cache; logits come from position L−1."""
        _check_inputs(input_ids, attention_mask)
        adapter = get_adapter(model)
        input_ids = input_ids.to(model.device)
        plan = self.window.plan(input_ids, question_span)
        cache = CompressedCache(model.config)
        compressed_layers = [i for i, layer in enumerate(cache.layers) if not getattr(layer, "is_sliding", False)]
        budget = self.budget.resolve(plan.prompt_length)
        layer_budgets = self.allocator.layer_budgets(len(compressed_layers), plan.prompt_length, budget)
        budgets = dict(zip(compressed_layers, layer_budgets, strict=True))
        report = CompressionReport(
            self.method, plan.prompt_length, budget,
            uncompressed_layers=[i for i in range(len(cache.layers)) if i not in compressed_layers],
        )
        compressor = LayerCompressor(plan, cache, self.scorer, self.selector, budgets, report, self)
        started = time.perf_counter()
        with compressor.attached(adapter.attention_modules()):
            compressor.active = plan.n_appended == 0
            logits = _forward(model, cache, input_ids, torch.arange(plan.prompt_length, device=model.device))
            if plan.n_appended:
                _score_appended(model, cache, plan, compressor)
        report.seconds = time.perf_counter() - started
        report.cache_bytes_after = cache.nbytes()
        report.cache_bytes_before = _uncompressed_bytes(cache, plan.prompt_length)
        get_plugin_manager().hook.prefill_compressed(report=report, pipeline=self)
        return PrefillResult(cache, logits, report)

    @torch.no_grad()
    def generate(
        self,
        model,
        tokenizer,
        context: str,
        question: str | None = None,
        question_aware: bool = True,
        max_new_tokens: int = 32,
        **generation_kwargs: Any,
    ) -> str:
        """Compress and answer. Question-aware: the question is inside the compressed prompt (DapQ's
        protocol); query-agnostic: only the context is compressed and the question is fed after."""
        options = parse_generation_options(generation_kwargs)
        prompt = build_prompt(tokenizer, context, question)
        ids = prompt.input_ids
        if question is None or question_aware:
            result = self.prefill(model, ids, question_span=prompt.question_span)
            logits, position = result.next_token_logits, ids.shape[1]
        else:
            result = self.prefill(model, ids[:, : prompt.context_length])
            rest = torch.arange(prompt.context_length, ids.shape[1], device=model.device)
            logits = _forward(model, result.cache, ids[:, prompt.context_length :].to(model.device), rest)
            position = ids.shape[1]
        self.last_report = result.report
        eos = _eos_ids(model, tokenizer)
        tokens = decode(model, result.cache, logits, position, max_new_tokens, options, eos)
        return tokenizer.decode(tokens, skip_special_tokens=True)


def _forward(model, cache, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    out = model(**model_inputs(model, cache, input_ids=input_ids, position_ids=positions[None], logits_to_keep=1))
    return out.logits[:, -1]


def _score_appended(model, cache: CompressedCache, plan: WindowPlan, compressor: LayerCompressor) -> None:
    """Run the appended window rows, compress on the fly, then put untouched layers back as they were."""
    untouched = {
        i: dict(layer.__dict__) for i, layer in enumerate(cache.layers) if i not in compressor.budgets
    }
    compressor.active, compressor.row_offset = True, plan.prompt_length
    _forward(model, cache, plan.appended_ids, plan.appended_positions[0])
    for i, state in untouched.items():
        cache.layers[i].__dict__.update(state)


def _uncompressed_bytes(cache: CompressedCache, prompt_length: int) -> int:
    total = 0
    for i, layer in enumerate(cache.layers):
        rows = layer.keys.shape[-2]
        full_rows = prompt_length if i in cache.evicted else rows
        total += 2 * layer.keys.numel() // max(rows, 1) * full_rows * layer.keys.element_size()
    return total


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
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


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}
