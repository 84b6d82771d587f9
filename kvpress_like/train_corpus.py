"""Offline training text for learned scorers, disjoint from every evaluation.

Two kinds of documents, alternating: **real text** (consecutive docstring paragraphs of the Python standard
library's own sources, read with :mod:`ast`, never imported, from a seeded starting point) and **generated
contexts** (the same prose with four facts of a training-only template inserted at seeded depths). The
evaluation tasks draw their haystacks from ``pydoc_data.topics`` (the language reference) and their needles
from their own templates, so neither the prose nor the templates are shared, and document ``i`` uses seed
``TRAIN_SEED_BASE + i``, a range that no evaluation grid reaches (``tests/test_train_scorer.py`` checks every
grid in ``docs/results/grids``).
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TRAIN_SEED_BASE = 9_000_000
FACT_TEMPLATE = "Archive note: the {colour} ledger of the {place} office is filed under code {code}."
_COLOURS = ("amber", "cobalt", "crimson", "ivory", "jade", "ochre", "scarlet", "slate", "teal", "umber")
_PLACES = ("Bergen", "Cusco", "Dakar", "Hanoi", "Lyon", "Oaxaca", "Perth", "Quito", "Tartu", "Zadar")


@dataclass(frozen=True)
class CorpusInfo:
    """What the real text is: where it comes from, how much, and its sha256 (recorded in every artifact)."""

    source: str
    paragraphs: int
    characters: int
    sha256: str


@lru_cache(maxsize=1)
def docstring_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs (no code, lists or headings; over 120 characters, ending a sentence) of the docstrings
    in the standard library's top-level modules, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
        for node in nodes:
            for block in (ast.get_docstring(node) or "").split("\n\n"):
                lines = block.strip().splitlines()
                if not lines or any(line.startswith((" ", ">>>", "*", "-", "=", "+")) for line in lines):
                    continue
                text = " ".join(line.strip() for line in lines)
                if len(text) > 120 and text[-1] in ".:":
                    paragraphs.append(text)
    return tuple(paragraphs)


def corpus_info() -> CorpusInfo:
    paragraphs = docstring_paragraphs()
    digest = hashlib.sha256("\n\n".join(paragraphs).encode()).hexdigest()
    return CorpusInfo(f"docstrings of the Python standard library at {sysconfig.get_paths()['stdlib']}",
                      len(paragraphs), sum(map(len, paragraphs)), digest)


def training_seed(index: int) -> int:
    return TRAIN_SEED_BASE + index


def training_document(tokenizer, index: int, context_tokens: int) -> str:
    """Document ``index``: about ``context_tokens`` tokens of prose; odd documents carry four generated facts."""
    rng = random.Random(training_seed(index))
    paragraphs = docstring_paragraphs()
    if not paragraphs:
        raise RuntimeError("no docstring prose found in the standard library: cannot build training documents")
    start, chosen, total = rng.randrange(len(paragraphs)), [], 0
    for offset in range(len(paragraphs)):
        paragraph = paragraphs[(start + offset) % len(paragraphs)]
        cost = len(tokenizer.encode(paragraph, add_special_tokens=False)) + 2
        if total + cost > context_tokens and chosen:
            break
        chosen.append(paragraph)
        total += cost
    if index % 2:
        for _ in range(4):
            fact = FACT_TEMPLATE.format(colour=rng.choice(_COLOURS), place=rng.choice(_PLACES),
                                        code=rng.randrange(10**6, 10**7))
            chosen.insert(rng.randrange(len(chosen) + 1), fact)
    return "\n\n".join(chosen)
