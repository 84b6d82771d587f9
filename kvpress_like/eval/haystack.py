"""Real English prose for haystacks: the standard library's ``pydoc_data.topics`` (no download)."""

from __future__ import annotations

import random
from functools import lru_cache


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Paragraphs of prose (no code blocks or headings) from the Python reference topics, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = block.strip().splitlines()
            if not lines or any(line.startswith((" ", "*", "=", "-")) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) > 120 and text[-1] in ".:":
                paragraphs.append(text)
    return tuple(paragraphs)


def haystack(tokenizer, n_tokens: int, seed: int) -> list[str]:
    """Consecutive paragraphs, from a seeded starting point, holding about ``n_tokens`` tokens."""
    paragraphs = prose_paragraphs()
    start = random.Random(seed).randrange(len(paragraphs))
    chosen, total = [], 0
    for offset in range(len(paragraphs)):
        paragraph = paragraphs[(start + offset) % len(paragraphs)]
        cost = len(tokenizer.encode(paragraph, add_special_tokens=False)) + 2
        if total + cost > n_tokens and chosen:
            break
        chosen.append(paragraph)
        total += cost
    return chosen
