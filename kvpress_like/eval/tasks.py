"""Tasks generated in code, seeded and deterministic, as pydantic samples (saved and loaded as JSONL).

Every generator has the signature ``(tokenizer, context_tokens, depth, seed) -> Sample``; the same
arguments always give the same sample. ``meta`` carries what the harness needs to run a sample on its
own: ``answer_prefix`` (text that opens the answer, so answers stay short: the assistant turn of a chat
model, or what follows the plain prompt's ``Answer:`` cue for a base model), ``max_new_tokens``
and ``match`` (how the answers are checked); ``followups`` lists more questions about the same context
(see :meth:`Sample.questions`). Users can bring their own JSONL of samples.

* ``single_needle`` — RULER S-NIAH: one "special magic number" hidden in prose (``pydoc_data.topics``).
* ``passkey`` — the classic pass-key retrieval in repetitive filler ("The grass is green. …").
* ``multi_key`` — RULER MK-NIAH: the asked key's number plus distractor needles with other keys
  (``ask_all``: every key is asked, one question each, about the same context).
* ``multi_value`` — RULER MV-NIAH: one key with several numbers; all of them must be returned
  (``n_keys``: more keys with their own numbers; ``ask_all``: every key is asked).
* ``variable_tracking`` — RULER VT: a chain ``VAR A = 12345``, ``VAR B = VAR A``, …; name every variable.
* ``prose_qa`` — a question about the real prose itself: which word follows a quoted passage.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvpress_like.errors import ConfigError
from kvpress_like.eval.haystack import haystack
from kvpress_like.prompting import answer_opening

MatchMode = Literal["any", "all", "word"]


class Sample(BaseModel):
    """One evaluation sample: a context, a question and the accepted answers.

    ``meta["match"]`` says how a prediction is checked: ``"any"`` (default: one accepted answer appears
    in it), ``"all"`` (every answer appears, e.g. multi-value), ``"word"`` (one answer appears as a
    whole word, case-insensitive).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    context: str
    question: str
    answers: list[str]
    meta: dict = Field(default_factory=dict)

    def is_correct(self, prediction: str) -> bool:
        """True when the prediction contains the answer(s) as ``meta["match"]`` requires."""
        return self.score(prediction) == 1.0 if self.match == "all" else self.score(prediction) > 0

    def score(self, prediction: str) -> float:
        """Share of the accepted answers found (``all``), or 1.0/0.0 (``any``, ``word``)."""
        if self.match == "word":
            found = [re.search(rf"(?<!\w){re.escape(a)}(?!\w)", prediction, re.IGNORECASE) for a in self.answers]
            return float(any(found))
        hits = [answer in prediction for answer in self.answers]
        if self.match == "all":
            return sum(hits) / len(hits) if hits else 0.0
        return float(any(hits))

    def questions(self) -> list[Sample]:
        """This sample, then one per entry of ``meta["followups"]``: the same context, another question.

        An entry is ``{"question": str, "answers": [str, ...], "meta": {...}}``; its ``meta`` overrides this
        sample's (e.g. its own ``answer_prefix``). None of the returned samples has follow-ups.
        """
        meta = {k: v for k, v in self.meta.items() if k != "followups"}
        out = [self.model_copy(update={"meta": meta})]
        for number, entry in enumerate(self.meta.get("followups", []), start=1):
            try:
                out.append(Sample(task=self.task, context=self.context, question=entry["question"],
                                  answers=entry["answers"], meta={**meta, **entry.get("meta", {})}))
            except (KeyError, TypeError, ValueError) as error:
                raise ConfigError(
                    f"follow-up {number} of a {self.task!r} sample is not a question ({error!r}); each entry of "
                    'meta["followups"] needs "question" and "answers" (and optionally "meta")'
                ) from None
        return out

    @property
    def match(self) -> MatchMode:
        return self.meta.get("match", "any")

    @property
    def answer_prefix(self) -> str:
        return self.meta.get("answer_prefix", "")

    @property
    def max_new_tokens(self) -> int:
        return int(self.meta.get("max_new_tokens", 16))


def insert_at_depth(paragraphs: list[str], needle: str, depth: float) -> str:
    """Join paragraphs with ``needle`` inserted as its own paragraph at relative ``depth`` in [0, 1]."""
    index = round(depth * len(paragraphs))
    return "\n\n".join([*paragraphs[:index], needle, *paragraphs[index:]])


def insert_many(paragraphs: list[str], needles: list[tuple[float, str]]) -> str:
    """Insert several ``(depth, needle)`` paragraphs; needles at the same slot keep their given order."""
    slots: dict[int, list[str]] = {}
    for depth, needle in needles:
        slots.setdefault(round(depth * len(paragraphs)), []).append(needle)
    out: list[str] = []
    for index in range(len(paragraphs) + 1):
        out.extend(slots.get(index, []))
        if index < len(paragraphs):
            out.append(paragraphs[index])
    return "\n\n".join(out)


def answer_positions(ids: list[int], tokenizer, answer: str) -> list[int]:
    """Positions in the token ids ``ids`` of the last occurrence of ``answer``'s tokens (tokenised as it is, then
    with a leading space, as inside prose); an error naming the answer when neither occurs."""
    for text in (answer.strip(), " " + answer.strip()):
        pattern = tokenizer.encode(text, add_special_tokens=False)
        for start in range(len(ids) - len(pattern), -1, -1):
            if ids[start : start + len(pattern)] == pattern:
                return list(range(start, start + len(pattern)))
    raise ConfigError(f"the answer {answer!r} does not occur in these {len(ids)} token ids, tokenised alone or after "
                      "a space; the needle must lie in the ids searched (e.g. the compressed part of the prompt)")


def _meta(tokenizer, context_tokens: int, depth: float, seed: int, **extra) -> dict:
    """A sample's ``meta``, its ``answer_prefix`` spelled to follow the tokenizer's prompt (``answer_opening``)."""
    if "answer_prefix" in extra:
        extra["answer_prefix"] = answer_opening(tokenizer, extra["answer_prefix"])
    return {"depth": depth, "context_tokens": context_tokens, "seed": seed, **extra}


def single_needle(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    """RULER S-NIAH style: one 'special magic number' hidden in prose."""
    rng = random.Random(seed)
    number = str(rng.randrange(10_000, 100_000))
    needle = f"The special magic number is {number}."
    context = insert_at_depth(haystack(tokenizer, context_tokens, seed), needle, depth)
    question = "What is the special magic number mentioned in the text? Answer with the number only."
    return Sample(
        task="single_needle", context=context, question=question, answers=[number],
        meta=_meta(
            tokenizer, context_tokens, depth, seed, answer_prefix="The special magic number is", max_new_tokens=8
        ),
    )


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def passkey(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    """Pass-key retrieval (Mohtashami & Jaggi 2023) in the classic repetitive filler."""
    rng = random.Random(seed)
    number = str(rng.randrange(10_000, 100_000))
    needle = f"The pass key is {number}. Remember it. {number} is the pass key."
    cost = len(tokenizer.encode(PASSKEY_FILLER + " ", add_special_tokens=False))
    fillers = [PASSKEY_FILLER] * max(1, context_tokens // max(cost, 1))
    index = round(depth * len(fillers))
    context = " ".join([*fillers[:index], needle, *fillers[index:]])
    question = "What is the pass key? Answer with the number only."
    return Sample(
        task="passkey", context=context, question=question, answers=[number],
        meta=_meta(tokenizer, context_tokens, depth, seed, answer_prefix="The pass key is", max_new_tokens=8),
    )


KEY_WORDS = (
    "apple", "river", "candle", "falcon", "garden", "harbor", "island", "jacket", "kettle", "ladder", "marble",
    "needle", "orange", "pepper", "quartz", "rabbit", "saddle", "teapot", "umbrella", "violin", "walnut", "yellow",
    "zipper", "anchor", "bamboo", "cactus", "dragon", "engine", "forest", "guitar", "hammer", "igloo", "jungle",
    "koala", "lemon", "magnet", "napkin", "oyster", "parrot", "rocket", "silver", "tomato", "velvet", "window",
)


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _key_question(key: str) -> tuple[str, str]:
    """Question and answer prefix asking for the number of ``key`` (MK-NIAH)."""
    question = f"What is the special magic number for {key} mentioned in the text? Answer with the number only."
    return question, f"The special magic number for {key} is"


def _values_question(key: str) -> tuple[str, str]:
    """Question and answer prefix asking for every number of ``key`` (MV-NIAH)."""
    question = f"What are all the special magic numbers for {key} mentioned in the text? List them."
    return question, f"The special magic numbers for {key} are:"


def _followup(tokenizer, question: tuple[str, str], answers: list[str], key: str) -> dict:
    """A ``meta["followups"]`` entry: another question about the same context."""
    return {"question": question[0], "answers": answers,
            "meta": {"key": key, "answer_prefix": answer_opening(tokenizer, question[1])}}


def multi_key(
    tokenizer, context_tokens: int, depth: float, seed: int, n_keys: int = 4, ask_all: bool = False
) -> Sample:
    """RULER MK-NIAH: the asked key's needle at ``depth``, ``n_keys - 1`` distractor keys elsewhere.

    With ``ask_all`` every distractor key is asked too, as a follow-up question about the same context.
    """
    rng = random.Random(seed)
    keys = rng.sample(KEY_WORDS, n_keys)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    needles = [(depth, _magic(keys[0], values[0]))]
    needles += [(rng.random(), _magic(k, v)) for k, v in zip(keys[1:], values[1:], strict=True)]
    context = insert_many(haystack(tokenizer, context_tokens, seed), needles)
    question, prefix = _key_question(keys[0])
    asked = zip(keys[1:], values[1:], strict=True)
    extra = {"followups": [_followup(tokenizer, _key_question(k), [v], k) for k, v in asked]}
    return Sample(
        task="multi_key", context=context, question=question, answers=[values[0]],
        meta=_meta(
            tokenizer, context_tokens, depth, seed, key=keys[0],
            distractors=dict(zip(keys[1:], values[1:], strict=True)),
            answer_prefix=prefix, max_new_tokens=10, **(extra if ask_all else {}),
        ),
    )


def multi_value(
    tokenizer, context_tokens: int, depth: float, seed: int, n_values: int = 4, n_keys: int = 1, ask_all: bool = False
) -> Sample:
    """RULER MV-NIAH: one key with ``n_values`` numbers (the first at ``depth``); all must be returned.

    ``n_keys > 1`` hides ``n_values`` numbers for each of ``n_keys - 1`` more keys at random depths; with
    ``ask_all`` each of them is asked too, as a follow-up question about the same context.
    """
    rng = random.Random(seed)
    key = rng.choice(KEY_WORDS)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(n_values)]
    needles = [(depth, _magic(key, values[0]))] + [(rng.random(), _magic(key, v)) for v in values[1:]]
    others = rng.sample([k for k in KEY_WORDS if k != key], n_keys - 1)
    other_values = [[str(rng.randrange(1_000_000, 10_000_000)) for _ in range(n_values)] for _ in others]
    needles += [(rng.random(), _magic(k, v)) for k, vs in zip(others, other_values, strict=True) for v in vs]
    context = insert_many(haystack(tokenizer, context_tokens, seed), needles)
    question, prefix = _values_question(key)
    asked = zip(others, other_values, strict=True)
    extra = {"followups": [_followup(tokenizer, _values_question(k), vs, k) for k, vs in asked]}
    return Sample(
        task="multi_value", context=context, question=question, answers=values,
        meta=_meta(
            tokenizer, context_tokens, depth, seed, key=key, match="all",
            answer_prefix=prefix, max_new_tokens=14 * n_values + 4,
            **({"other_keys": dict(zip(others, other_values, strict=True))} if others else {}),
            **(extra if ask_all else {}),
        ),
    )


def variable_tracking(tokenizer, context_tokens: int, depth: float, seed: int, n_hops: int = 3) -> Sample:
    """RULER VT: ``VAR A = v`` then ``n_hops`` assignments ``VAR B = VAR A`` … spread from ``depth`` on."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    span = (1 - depth) / (n_hops + 1)
    needles = [(depth + i * span, s) for i, s in enumerate(statements)]
    context = insert_many(haystack(tokenizer, context_tokens, seed), needles)
    question = f"Find all variables that are assigned the value {value} in the text above."
    return Sample(
        task="variable_tracking", context=context, question=question, answers=names,
        meta=_meta(
            tokenizer, context_tokens, depth, seed, match="all", max_new_tokens=12 * (n_hops + 1) + 4,
            answer_prefix=f"According to the chain of variable assignments in the text, the variables assigned the "
            f"value {value} are:",
        ),
    )


_WORD = re.compile(r"^[A-Za-z]{5,}$")


def prose_qa(tokenizer, context_tokens: int, depth: float, seed: int, quote_words: int = 8) -> Sample:
    """A question about the prose itself: which word follows a quoted passage (taken near ``depth``).

    The quoted passage occurs exactly once in the context, and the answer is a word of at least five
    letters, so the answer comes from reading the context rather than from common phrases.
    """
    rng = random.Random(seed)
    paragraphs = haystack(tokenizer, context_tokens, seed)
    context = "\n\n".join(paragraphs)
    order = sorted(range(len(paragraphs)), key=lambda i: (abs(i / max(len(paragraphs) - 1, 1) - depth), i))
    for index in order:
        words = paragraphs[index].split()
        starts = list(range(quote_words, len(words)))
        rng.shuffle(starts)
        for start in starts:
            answer = words[start].strip(string.punctuation)
            quote = " ".join(words[start - quote_words : start])
            if _WORD.match(answer) and words[start] == answer and context.count(quote) == 1:
                question = f'In the text above, which word comes right after "{quote}"? Answer with one word.'
                return Sample(
                    task="prose_qa", context=context, question=question, answers=[answer],
                    meta=_meta(
                        tokenizer, context_tokens, index / max(len(paragraphs) - 1, 1), seed, match="word",
                        answer_prefix="The word is", max_new_tokens=6, quote=quote,
                    ),
                )
    raise ConfigError(f"no usable quote found for prose_qa with {context_tokens} tokens and seed {seed}")


Generator = Callable[..., Sample]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its generator and whether it uses the needle depth."""

    name: str
    generate: Generator
    uses_depth: bool = True
    summary: str = ""


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("single_needle", single_needle, True, "one magic number in prose (RULER S-NIAH)"),
        TaskSpec("passkey", passkey, True, "a pass key in repetitive filler"),
        TaskSpec("multi_key", multi_key, True, "the asked key among distractor keys (RULER MK-NIAH)"),
        TaskSpec("multi_value", multi_value, True, "every number of one key (RULER MV-NIAH)"),
        TaskSpec("variable_tracking", variable_tracking, True, "follow a chain of assignments (RULER VT)"),
        TaskSpec("prose_qa", prose_qa, True, "which word follows a quoted passage of the prose"),
    )
}

DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks are: {', '.join(TASKS)}")
    return TASKS[name]


def make_samples(
    tokenizer,
    task: str,
    context_tokens: int,
    n: int,
    seed: int = 0,
    depths: Iterable[float] = DEFAULT_DEPTHS,
    **options,
) -> list[Sample]:
    """``n`` samples of ``task``: sample i uses depth ``depths[i % len(depths)]`` and seed ``seed + i``.

    The seed also picks the haystack's starting paragraph, so samples differ in their prose as well.
    """
    spec = task_spec(task)
    depths = list(depths) or [0.5]
    return [
        spec.generate(tokenizer, context_tokens, depths[i % len(depths)], seed + i, **options) for i in range(n)
    ]


def save_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples as JSON lines (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(sample.model_dump_json() + "\n")
    return path


def load_jsonl(path: str | Path) -> list[Sample]:
    """Read samples written by :func:`save_jsonl` (or by hand: one ``Sample`` object per line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample file {str(path)!r} does not exist")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            samples.append(Sample.model_validate(json.loads(line)))
        except ValueError as error:
            raise ConfigError(f"{path}:{number}: not a valid sample ({error})") from None
    return samples


# RULER's eleven offline tasks (kvpress_like.eval.ruler), registered beside the ones above.
from kvpress_like.eval.ruler import generators as _ruler_generators  # noqa: E402

TASKS.update({name: TaskSpec(name, generate, False, summary)
              for name, (generate, summary) in _ruler_generators().items()})
