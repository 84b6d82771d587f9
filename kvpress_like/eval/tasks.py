"""Tasks generated in code, seeded and deterministic, as pydantic samples."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from kvpress_like.eval.haystack import haystack


class Sample(BaseModel):
    """One evaluation sample: a context, a question and the accepted answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    context: str
    question: str
    answers: list[str]
    meta: dict = Field(default_factory=dict)

    def is_correct(self, prediction: str) -> bool:
        """True when any accepted answer appears in the prediction."""
        return any(answer in prediction for answer in self.answers)


def insert_at_depth(paragraphs: list[str], needle: str, depth: float) -> str:
    """Join paragraphs with ``needle`` inserted as its own paragraph at relative ``depth`` in [0, 1]."""
    index = round(depth * len(paragraphs))
    return "\n\n".join([*paragraphs[:index], needle, *paragraphs[index:]])


def single_needle(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    """RULER S-NIAH style: one 'special magic number' hidden in prose."""
    rng = random.Random(seed)
    number = str(rng.randrange(10_000, 100_000))
    needle = f"The special magic number is {number}."
    context = insert_at_depth(haystack(tokenizer, context_tokens, seed), needle, depth)
    question = "What is the special magic number mentioned in the text? Answer with the number only."
    return Sample(
        task="single_needle", context=context, question=question, answers=[number],
        meta={"depth": depth, "context_tokens": context_tokens, "seed": seed},
    )
