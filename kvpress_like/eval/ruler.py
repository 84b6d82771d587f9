"""RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", NVIDIA/RULER ``scripts/synthetic.yaml``), generated here, seeded and offline, as harness tasks.

Eleven of RULER's thirteen tasks, with RULER's templates, parameters, answer prefixes, generation lengths and
metrics:

* NIAH (needle in a haystack; needle ``One of the special magic {numbers|uuids} for {key} is: {value}.``):
  ``single_1`` (noise haystack, word key, number), ``single_2`` (essay haystack), ``single_3`` (essay, UUID value),
  ``multikey_1`` (essay, 4 keys, one asked), ``multikey_2`` (the haystack is all needles, word keys),
  ``multikey_3`` (all needles, UUID keys and values), ``multivalue`` (one key, 4 values), ``multiquery``
  (4 keys, all asked); metric ``string_match_all``.
* ``vt``: variable tracking, one chain of 4 hops in the noise haystack, after one worked example (RULER's
  one-shot example, at most 500 tokens, 3-letter names); ``string_match_all``.
* ``cwe``: common words extraction (10 words repeated 30 times and the others 3 times from 4k tokens on; 6 and
  1 below, with a shorter worked example, as RULER); ``string_match_all``.
* ``fwe``: frequent words extraction (coded 6-letter words with Zipf counts, alpha 2, the top word replaced by
  ``...``); ``string_match_all``.

What differs from RULER, and why:

* **No Paul Graham essays** (RULER's "essay" haystack is downloaded; nothing here may download): the essay
  haystack is the standard library's prose (:func:`kvpress_like.eval.haystack.prose_paragraphs`) from a seeded
  paragraph on. **QA 1–2 are not here**: they need SQuAD and HotpotQA, which are not available offline.
* Word keys and the common words come from :mod:`kvpress_like.eval.ruler_words` (RULER uses ``wonderwords``).
* Within a sample, keys and values are drawn without repeats (RULER draws them independently; a repeat would
  make the answer ambiguous).
* Length: RULER fits the largest haystack with prompt + generated tokens ≤ the sequence length; here the prompt
  is the context, question and answer prefix, tokenised piece by piece as the harness does, without a chat
  template (RULER's "base" template), so the harness's chat template adds its few tokens on top.
* The harness checks answers with :class:`kvpress_like.eval.tasks.Sample`'s ``"all"`` match, which is RULER's
  ``string_match_all`` except that it is case-sensitive (RULER lower-cases both sides; see
  :func:`string_match_all`).

Every generator has the harness's signature ``(tokenizer, context_tokens, depth, seed) -> Sample``; RULER
places needles at depths it draws itself, so ``depth`` is not used.
"""

from __future__ import annotations

import itertools
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

from kvpress_like.errors import ConfigError
from kvpress_like.eval.haystack import prose_paragraphs
from kvpress_like.eval.ruler_words import ADJECTIVES, NOUNS, common_vocabulary, prose_words
from kvpress_like.prompting import answer_opening

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER's 40 insertion depths, in % of the sentences
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TOKENS, VT_TOKENS, CWE_TOKENS, FWE_TOKENS = 128, 30, 120, 50  # RULER's tokens_to_generate


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the share of references found in the prediction (lower-cased)."""
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references) if references else 0.0


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_part`` for one sample: 1 when any reference is in the prediction (lower-cased)."""
    text = prediction.lower()
    return float(any(ref.lower() in text for ref in references))


# ------------------------------------------------------------------------------------------------
# Draws
# ------------------------------------------------------------------------------------------------


def _rng(task: str, seed: int) -> random.Random:
    """The random stream of one task's sample (seeded by task and seed, so tasks with one seed differ)."""
    return random.Random(f"{task}:{seed}")


def _draw(rng: random.Random, kind: str) -> str:
    """A RULER needle part: a 7-digit number, a version-4 UUID or an ``adjective-noun`` word."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _fresh(rng: random.Random, kind: str, used: set[str]) -> str:
    """A draw of ``kind`` not in ``used`` (then added to it)."""
    while (value := _draw(rng, kind)) in used:
        pass
    used.add(value)
    return value


def _fit(cost: Callable[[int], int], target: int, task: str, smallest: int = 1) -> int:
    """The largest haystack size ``n >= smallest`` with ``cost(n) <= target`` (RULER's binary search; cost grows
    with n)."""
    if cost(smallest) > target:
        raise ConfigError(f"RULER task {task!r} needs more than {target} tokens even with the smallest haystack "
                          f"({cost(smallest)} tokens); ask for a longer context")
    low, high = smallest, 2 * smallest
    while cost(high) <= target:
        low, high = high, high * 2
    while high - low > 1:  # cost(low) fits, cost(high) does not
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= target else (low, middle)
    return low


def _tokens(tokenizer, *pieces: str) -> int:
    return sum(len(tokenizer.encode(piece, add_special_tokens=False)) for piece in pieces if piece)


# ------------------------------------------------------------------------------------------------
# Haystacks
# ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _essay_words() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The prose's words in order, and the index of each paragraph's first word."""
    words: list[str] = []
    starts = []
    for paragraph in prose_paragraphs():
        starts.append(len(words))
        words += paragraph.split()
    return tuple(words), tuple(starts)


def essay_text(n_words: int, seed: int) -> str:
    """``n_words`` words of the essay stand-in from a seeded paragraph on (wrapping around)."""
    words, starts = _essay_words()
    start = starts[random.Random(seed).randrange(len(starts))]
    return " ".join(words[(start + i) % len(words)] for i in range(n_words))


def _in_essay(text: str, needles: list[str], rng: random.Random) -> str:
    """RULER's essay insertion: needles between sentences at depths drawn from :data:`DEPTHS`."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    cuts = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(needles)))
    pieces, last = [], 0
    for cut, needle in zip(cuts, needles, strict=True):
        pieces += [" ".join(sentences[last:cut]), needle]
        last = cut
    pieces.append(" ".join(sentences[last:]))
    return " ".join(piece for piece in pieces if piece)


def _in_lines(lines: list[str], needles: list[str], rng: random.Random) -> str:
    """RULER's line insertion: each needle as its own line at a distinct random line index."""
    if len(lines) < len(needles):
        raise ConfigError(f"a haystack of {len(lines)} lines cannot hold {len(needles)} needles")
    lines = list(lines)
    for index, needle in zip(sorted(rng.sample(range(len(lines)), len(needles)), reverse=True), needles, strict=True):
        lines.insert(index, needle)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# NIAH
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NiahConfig:
    """One RULER NIAH task: haystack ``noise`` / ``essay`` / ``needle``; key and value kinds; needle counts."""

    haystack: str
    key_kind: str = "words"
    value_kind: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH = {
    "niah_single_1": NiahConfig("noise"),
    "niah_single_2": NiahConfig("essay"),
    "niah_single_3": NiahConfig("essay", value_kind="uuids"),
    "niah_multikey_1": NiahConfig("essay", keys=4),
    "niah_multikey_2": NiahConfig("needle"),
    "niah_multikey_3": NiahConfig("needle", key_kind="uuids", value_kind="uuids"),
    "niah_multivalue": NiahConfig("essay", values=4),
    "niah_multiquery": NiahConfig("essay", keys=4, queries=4),
}


def _niah_texts(config: NiahConfig, query: str) -> tuple[str, str, str]:
    """RULER's NIAH template split into (preamble, question, answer prefix); singular when one value is asked."""
    kind = config.value_kind
    if config.queries * config.values == 1:
        return (f"A special magic {kind[:-1]} is hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {kind[:-1]} afterwards.",
                f"What is the special magic {kind[:-1]} for {query} mentioned in the provided text?",
                f"The special magic {kind[:-1]} for {query} mentioned in the provided text is")
    return (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.",
            f"What are all the special magic {kind} for {query} mentioned in the provided text?",
            f"The special magic {kind} for {query} mentioned in the provided text are")


def niah(tokenizer, context_tokens: int, depth: float, seed: int, task: str = "niah_single_1"):
    """A RULER NIAH sample (:data:`NIAH` names the eight configurations)."""
    config = NIAH[task]

    def build(n: int):
        rng = _rng(task, seed)
        used: set[str] = set()
        keys = [_fresh(rng, config.key_kind, used) for _ in range(max(config.keys, config.queries))]
        values = [[_fresh(rng, config.value_kind, used) for _ in range(config.values)] for _ in keys]
        needles = [NEEDLE.format(kind=config.value_kind, key=k, value=v) for k, vs in zip(keys, values, strict=True)
                   for v in vs]
        rng.shuffle(needles)
        if config.haystack == "essay":
            haystack = _in_essay(essay_text(n, seed), needles, rng)
        else:
            lines = [NOISE] * n if config.haystack == "noise" else [
                NEEDLE.format(kind=config.value_kind, key=_fresh(rng, config.key_kind, used),
                              value=_fresh(rng, config.value_kind, used)) for _ in range(n)]
            haystack = _in_lines(lines, needles, rng)
        asked = rng.sample(range(len(keys)), config.queries)
        names = [keys[i] for i in asked]
        query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
        preamble, question, prefix = _niah_texts(config, query)
        answers = [v for i in asked for v in values[i]]
        return f"{preamble}\n{haystack}", question, prefix, answers, {"keys": keys, "values": values, "asked": names}

    smallest = 1 if config.haystack == "essay" else config.keys * config.values  # a line for each needle
    return _sample(tokenizer, task, context_tokens, seed, build, NIAH_TOKENS, smallest)


# ------------------------------------------------------------------------------------------------
# Variable tracking, common words, frequent words
# ------------------------------------------------------------------------------------------------


VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_ICL_TOKENS = 500  # RULER's worked example is made at a sequence length of 500


def _vt_texts(value: str, names: int) -> tuple[str, str]:
    return (f"Question: Find all variables that are assigned the value {value} in the text above.",
            f"Answer: According to the chain(s) of variable assignment in the text above, {names} variables are "
            f"assigned the value {value}, they are:")


def _vt_chain(rng: random.Random, n: int, hops: int, name_length: int) -> tuple[str, str, list[str]]:
    """(haystack with one chain, value, names): ``VAR A = v`` then ``VAR B = VAR A`` … in ``n`` noise lines."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        names += [name] if name not in names else []
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names)]
    lines = [NOISE] * n
    for offset, index in enumerate(sorted(rng.sample(range(n), len(chain)))):
        lines.insert(index + offset, chain[offset])
    return "\n".join(lines), value, names


def variable_tracking(tokenizer, context_tokens: int, depth: float, seed: int, hops: int = 4,
                      example_tokens: int = VT_ICL_TOKENS):
    """RULER ``vt``: one chain of ``hops`` assignments in noise, after a worked example (3-letter names) of at
    most ``example_tokens`` tokens."""

    def example(n: int) -> str:
        haystack, value, names = _vt_chain(_rng("vt example", seed), n, hops, 3)
        question, prefix = _vt_texts(value, hops + 1)
        return f"{VT_INSTRUCTION}\n\n{haystack}\n{question} {prefix} {' '.join(names)}\n"

    shot = example(_fit(lambda n: _tokens(tokenizer, example(n)), example_tokens, "vt's example", hops + 1))

    def build(n: int):
        haystack, value, names = _vt_chain(_rng("vt", seed), n, hops, 5)
        question, prefix = _vt_texts(value, hops + 1)
        return f"{shot}{VT_INSTRUCTION}\n\n{haystack}", question, prefix, names, {"value": value}

    return _sample(tokenizer, "vt", context_tokens, seed, build, VT_TOKENS, hops + 1)


CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.")


def _cwe_list(rng: random.Random, n_words: int, common: int, repeats: int, rare_repeats: int):
    """(numbered list, common words): ``common`` words ``repeats`` times, the other ``n_words - common`` fewer."""
    pool = common_vocabulary() if n_words <= len(common_vocabulary()) else prose_words()
    if n_words > len(pool):
        raise ConfigError(f"cwe needs {n_words} distinct words, more than the {len(pool)} available; "
                          "ask for a shorter context")
    words = rng.sample(pool, n_words)
    entries = words[:common] * repeats + words[common:] * rare_repeats
    rng.shuffle(entries)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries)), words[:common]


def common_words(tokenizer, context_tokens: int, depth: float, seed: int, common: int = 10):
    """RULER ``cwe``: the ``common`` most frequent words of a numbered list, after one worked example."""
    long = context_tokens >= 4096  # RULER's switch between its two frequency settings
    shot_size, shot_reps, shot_rare, reps, rare = (40, 10, 3, 30, 3) if long else (20, 3, 1, 6, 1)
    question = f"Question: What are the {common} most common words in the above list?"
    prefix = f"Answer: The top {common} words that appear most often in the list are:"

    def build(n: int):
        rng = _rng("cwe", seed)
        listed, shown = _cwe_list(rng, shot_size, common, shot_reps, shot_rare)
        answer = " ".join(f"{i + 1}. {word}" for i, word in enumerate(shown))
        shot = f"{CWE_INSTRUCTION}\n{listed}\n{question} {prefix} {answer}\n"
        listed, words = _cwe_list(rng, common + n, common, reps, rare)
        return f"{shot}{CWE_INSTRUCTION}\n{listed}", question, prefix, words, {}

    return _sample(tokenizer, "cwe", context_tokens, seed, build, CWE_TOKENS)


def zeta(alpha: float) -> float:
    """Riemann zeta for ``alpha > 1`` (partial sum plus its Euler–Maclaurin tail)."""
    if alpha <= 1:
        raise ConfigError(f"zeta needs alpha > 1, got {alpha}")
    n = 1000
    return sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2


def zipf_counts(n_words: int, vocabulary: int, alpha: float) -> list[int]:
    """RULER's ``fwe`` counts: the word of rank k appears ``int(n_words * k**-alpha / zeta(alpha))`` times."""
    total = zeta(alpha)
    return [int(n_words * k ** -alpha / total) for k in range(1, vocabulary + 1)]


FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                   "frequently appeared coded words.")


def frequent_words(tokenizer, context_tokens: int, depth: float, seed: int, alpha: float = 2.0, word_length: int = 6):
    """RULER ``fwe``: the three most frequent coded words of a Zipf-distributed text (rank 1 is ``...``)."""
    vocabulary = max(4, (context_tokens - FWE_TOKENS) // 50)  # RULER: vocab_size = sequence length // 50
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"

    def build(n: int):
        rng = _rng("fwe", seed)
        used: set[str] = set()
        words = ["..."] + [_fresh_code(rng, word_length, used) for _ in range(vocabulary - 1)]
        counts = zipf_counts(n, vocabulary, alpha)
        text = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
        rng.shuffle(text)
        return f"{FWE_INSTRUCTION} {' '.join(text)}", question, prefix, words[1:4], {"counts": counts[:5]}

    sample = _sample(tokenizer, "fwe", context_tokens, seed, build, FWE_TOKENS)
    counts = sample.meta["counts"]
    if not counts[1] > counts[2] > counts[3] > counts[4]:
        raise ConfigError(f"fwe at {context_tokens} tokens has tied top counts {counts}; ask for a longer context")
    return sample


def _fresh_code(rng: random.Random, length: int, used: set[str]) -> str:
    while (word := "".join(rng.choices(string.ascii_lowercase, k=length))) in used:
        pass
    used.add(word)
    return word


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------


def _sample(tokenizer, task: str, context_tokens: int, seed: int, build: Callable[[int], tuple], generate: int,
            smallest: int = 1):
    """Fit ``build``'s haystack size to ``context_tokens`` (prompt + generated tokens) and make the harness sample."""
    from kvpress_like.eval.tasks import Sample  # tasks registers this module's generators, so not at import

    def cost(n: int) -> int:
        context, question, prefix, _, _ = build(n)
        return _tokens(tokenizer, context, question, prefix) + generate

    size = _fit(cost, context_tokens, task, smallest)
    context, question, prefix, answers, extra = build(size)
    meta = {"ruler_task": task, "context_tokens": context_tokens, "seed": seed, "haystack_size": size,
            "length": cost(size), "match": "all", "answer_prefix": answer_opening(tokenizer, prefix),
            "max_new_tokens": generate, **extra}
    return Sample(task=f"ruler_{task}", context=context, question=question, answers=answers, meta=meta)


def generators() -> dict[str, tuple[Callable, str]]:
    """``{harness task name: (generator, summary)}`` for the eleven RULER tasks."""
    out: dict[str, tuple[Callable, str]] = {
        f"ruler_{name}": (partial(niah, task=name), f"RULER {name} ({config.haystack} haystack)")
        for name, config in NIAH.items()
    }
    out["ruler_vt"] = (variable_tracking, "RULER vt: one chain of 4 hops in noise, one worked example")
    out["ruler_cwe"] = (common_words, "RULER cwe: the 10 most common words of a numbered list")
    out["ruler_fwe"] = (frequent_words, "RULER fwe: the 3 most frequent coded words (Zipf, alpha 2)")
    return out
