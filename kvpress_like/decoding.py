"""A small decode loop that continues from a compressed cache at the right positions."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvpress_like.errors import ConfigError
from kvpress_like.prefill import feed


class GenerationOptions(BaseModel):
    """Options of :meth:`Pipeline.generate` beyond the prompt: greedy unless ``do_sample``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop_at_eos: bool = True


def parse_generation_options(options: dict) -> GenerationOptions:
    try:
        return GenerationOptions.model_validate(options)
    except ValidationError as error:
        valid = ", ".join(GenerationOptions.model_fields)
        raise ConfigError(f"invalid generation options: {_first_errors(error)}; valid options: {valid}") from None


def _first_errors(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())


def next_token(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token ``[batch]`` from ``[batch, vocab]`` logits."""
    if not options.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / options.temperature
    if options.top_k is not None:
        kth = logits.topk(min(options.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= options.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_batch(
    model,
    cache,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    options: GenerationOptions,
    eos_token_ids: set[int],
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` ids per sequence of ``first_logits`` ``[batch, vocab]``.

    Each sequence stops at its own end-of-sequence token (when ``options.stop_at_eos``); positions continue
    per sequence from what the cache has seen (see :func:`kvpress_like.prefill.feed`).
    """
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    batch = first_logits.shape[0]
    answers: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    logits = first_logits
    schedule = getattr(cache, "decoding", None)
    for step in range(max_new_tokens):
        if schedule is not None:  # a pseudo decode window compresses between steps
            schedule.between_steps(model, cache)
        token = next_token(logits, options, generator)
        for row in range(batch):
            if not done[row]:
                answers[row].append(int(token[row]))
                done[row] = options.stop_at_eos and answers[row][-1] in eos_token_ids
        if all(done) or step == max_new_tokens - 1:
            break
        logits = feed(model, cache, token[:, None].to(model.device))
    if schedule is not None:
        schedule.note_peak(cache)
    return answers
