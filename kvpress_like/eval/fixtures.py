"""What the benchmark (:mod:`.bench`) and the peak-memory cases (:mod:`.memory`) both run: the same prompt of a
given length, and the plain uncompressed prefill every ratio is taken against."""

from __future__ import annotations

import torch

from kvpress_like.cache import CompressedCache
from kvpress_like.eval.haystack import haystack
from kvpress_like.prefill import forward
from kvpress_like.prompting import build_prompt


def bench_prompt(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """A templated prompt of about ``length`` tokens of prose, cut to exactly ``length`` ids."""
    context = "\n\n".join(haystack(tokenizer, length + 512, seed))
    prompt = build_prompt(tokenizer, context, "Summarize the text above.")
    ids, cut = prompt.input_ids, prompt.context_length
    tail = ids.shape[1] - cut
    if cut < length - tail:
        raise ValueError(f"could only build a {ids.shape[1]}-token prompt for length {length}")
    return torch.cat([ids[:, : length - tail], ids[:, cut:]], dim=1)


@torch.no_grad()
def plain_prefill(model, ids: torch.Tensor) -> tuple[CompressedCache, torch.Tensor]:
    """The uncompressed prefill of ``ids``: its cache and logits."""
    cache = CompressedCache(model.config)
    logits = forward(model, cache, ids.to(model.device), torch.arange(ids.shape[1], device=model.device))
    return cache, logits
