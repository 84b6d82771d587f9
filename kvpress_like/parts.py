"""Contracts of the four kinds of parts a compression method is assembled from.

A part is a small class with one job. It declares its ``name``, a one-line ``summary`` and a
pydantic ``Config``; it is built as ``Part(config)``. Plugins register part classes through the
hooks in :mod:`kvpress_like.hookspecs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from kvpress_like.errors import ConfigError


class PartConfig(BaseModel):
    """Base of every part's config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Part:
    """Common base: a name, a summary, a validated config."""

    kind: ClassVar[str]
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PartConfig]] = PartConfig

    def __init__(self, config: PartConfig | None = None):
        self.config = config if config is not None else self.Config()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        return f"{type(self).__name__}({fields})"


@dataclass(frozen=True)
class WindowPlan:
    """What a window builder asks the pipeline to run.

    ``window_rows`` are the row indices, in the sequence ``prompt + appended``, of the queries that
    judge the prompt's keys. ``appended_ids`` / ``appended_positions`` (``[batch, n]``) are extra tokens
    fed after the prompt and dropped after scoring; ``None`` when the window lies inside the prompt.
    ``query_shift`` moves every window query that many positions later before scoring (RoPE rotates by the
    difference): the queries then judge the keys from rows ``window_rows + query_shift``, which is how the
    ``reaimed`` window puts the prompt's last queries at the decoding positions without extra rows.
    """

    prompt_length: int
    window_rows: torch.Tensor
    appended_ids: torch.Tensor | None = None
    appended_positions: torch.Tensor | None = None
    query_shift: int = 0

    @property
    def scored_rows(self) -> torch.Tensor:
        """The rows the window's queries judge the keys from (after any :attr:`query_shift`)."""
        return self.window_rows + self.query_shift if self.query_shift else self.window_rows

    @property
    def n_appended(self) -> int:
        return 0 if self.appended_ids is None else self.appended_ids.shape[1]

    @functools.cached_property
    def row_run(self) -> tuple[int, int] | None:
        """``(first, end)`` when the window rows are one increasing run ``first … end-1`` (suffix and appended
        windows), else ``None``; computed once per plan, not in every layer's hook."""
        rows = self.window_rows
        if not rows.numel() or not bool((rows.diff() == 1).all()):
            return None
        return int(rows[0]), int(rows[-1]) + 1


class WindowBuilder(Part):
    """Decides which queries judge the importance of the prompt's keys.

    ``streams``: the window of each round of a progressive prefill (:mod:`kvpress_like.progressive`),
    :meth:`plan_round`, has a bounded number of rows, so such a prefill can use it.
    """

    kind = "window"
    streams: bool = True

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        raise NotImplementedError

    def plan_round(
        self, prefix_ids: torch.Tensor, chunk_start: int, question_span: tuple[int, int] | None = None
    ) -> WindowPlan:
        """The window of a progressive prefill's round: the prompt so far is ``prefix_ids``, whose rows from
        ``chunk_start`` on are this round's chunk (earlier rows are compressed already, and window rows
        among them are dropped). By default the window planned on the prefix."""
        return self.plan(prefix_ids, question_span)


@dataclass
class LayerContext:
    """Everything a scorer may read for one attention layer.

    Shapes: ``queries`` ``[batch, q_heads, window, head_dim]`` (post-RoPE, post-QK-norm),
    ``keys``/``values`` ``[batch, kv_heads, T, head_dim]`` (all rows cached so far, post-RoPE),
    ``query_rows`` ``[window]`` (row index of each query in the same ``T`` axis, for causal masking).
    Only the first ``prompt_length`` key rows are candidates for keeping. ``hidden_states`` are the
    attention inputs of the prompt rows ``[batch, L, hidden]`` (when the window's rows run in a later
    forward than the prompt's, as in ``prefill_many``, only for scorers that declare
    ``reads_hidden_states``); ``rope_at(positions)`` gives the layer's ``(cos, sin)`` ``[1, n, rot_dim]``
    at any positions (for scorers that look ahead, e.g. Expected Attention, from :attr:`next_position`).
    In a round of a progressive prefill the key rows are those held from earlier rounds, then the chunk's
    (``prompt_length`` counts both: a number of rows, not a position); ``hidden_states`` are the chunk's
    rows only, the first at prompt position ``hidden_start`` (0 otherwise); ``prompt_end`` is the prefix's
    length (``None`` otherwise: the prompt's); ``state`` is a per-layer dict the scorer may keep across the
    rounds (empty, and used once, in every other prefill). There is no budget here:
    how many tokens stay is the allocator's and the selector's business, so scores serve every budget.
    A left-padded batch is scored one sequence at a time (a batch of one, in its own positions);
    ``sequence`` is that sequence's row in the batch (0 otherwise).
    """

    layer_idx: int
    module: torch.nn.Module
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    query_rows: torch.Tensor
    prompt_length: int
    scaling: float
    hidden_states: torch.Tensor | None
    rope_at: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    sequence: int = 0
    hidden_start: int = 0
    prompt_end: int | None = None
    state: dict = field(default_factory=dict)

    @property
    def num_kv_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def next_position(self) -> int:
        """Position of the first token after the prompt (after the prefix, in a progressive round)."""
        return self.prompt_length if self.prompt_end is None else self.prompt_end


class Scorer(Part):
    """Scores every prompt key: ``[batch, kv_heads, prompt_length]``, higher means keep.

    Scores never depend on the budget, so one scoring serves every budget. Usually they are real. A
    scorer whose method selects in two stages returns them complex instead: the real part is the score
    every selector ranks by, the imaginary part a *first-stage* score that a two-stage selector (``critical``:
    part of the budget by the first-stage score, the rest by the real part) reads as well.

    A scorer declares what it reads beyond the window's queries and the keys/values:
    ``reads_hidden_states`` (it reads ``ctx.hidden_states``; a prefill whose window rows run in a later
    forward then keeps the prompt's attention inputs until then). A progressive prefill gives such a scorer
    one chunk's rows per round, so it must also declare ``accumulates_hidden_states`` (it sums what it
    needs over the rounds in ``ctx.state``), or it is refused there.

    Between the rounds of a progressive prefill the rows held from earlier rounds are scored again by the
    new round's window; :meth:`merge_rounds` combines that with their scores from the earlier rounds. A
    scorer that reads hidden states or merges rounds (:attr:`merges_rounds`) is called every round, also
    when the layer keeps every row.
    """

    kind = "scorer"
    reads_hidden_states: ClassVar[bool] = False
    accumulates_hidden_states: ClassVar[bool] = False

    def score(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    @property
    def merges_rounds(self) -> bool:
        """Whether :meth:`merge_rounds` keeps anything of the earlier rounds' scores."""
        return False

    def merge_rounds(self, earlier: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Scores of the rows held from earlier rounds of a progressive prefill ``[batch, kv_heads, held]``, from
        their last scores ``earlier`` and this round's ``current``; by default this round's (the streaming
        variant judges what it holds by its newest window)."""
        return current


class Allocator(Part):
    """Splits the budget across layers. ``uses_budget = False`` marks allocators that ignore it."""

    kind = "allocator"
    uses_budget: ClassVar[bool] = True
    model_wide: ClassVar[bool] = False  # budgets shared across layers: every layer is scored before any is pruned

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        raise NotImplementedError

    def head_budgets(self, scores: torch.Tensor, layer_budget: int, protected: torch.Tensor) -> torch.Tensor:
        """Tokens per (sequence, KV head), ``[batch, kv_heads]``, averaging ``layer_budget``; equal by default.

        ``scores`` is ``[batch, kv_heads, L]``; ``protected`` ``[L]`` marks tokens the selector always keeps.
        """
        return torch.full(scores.shape[:2], layer_budget, dtype=torch.long)

    def model_head_budgets(
        self, scores: dict[int, torch.Tensor], layer_budgets: dict[int, int], protected: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """Tokens per (sequence, KV head) of every layer, ``{layer: [batch, kv_heads]}``, from every layer's scores
        (``model_wide`` allocators only); together they keep ``Σ kv_heads × layer_budgets[layer]`` tokens."""
        raise NotImplementedError(f"{type(self).__name__} allocates layer by layer (model_wide is False)")


class Selector(Part):
    """Turns scores and a per-layer budget into kept prompt indices ``[batch, kv_heads, k]``, sorted.

    It ranks by the real part of the scores; only a two-stage selector reads the first-stage scores in
    the imaginary part of complex scores (see :class:`Scorer`).
    """

    kind = "selector"
    decides_counts: ClassVar[bool] = False  # True: head_counts says how many tokens each head keeps (threshold)

    def head_counts(self, scores: torch.Tensor, protected: torch.Tensor, layer_budget: int) -> torch.Tensor:
        """Tokens per (sequence, KV head) ``[batch, kv_heads]`` that a selector which :attr:`decides_counts` keeps,
        at most ``layer_budget``; such a selector replaces the allocator's head budgets (and every layer is scored,
        also when its budget holds the whole prompt)."""
        raise NotImplementedError(f"{type(self).__name__} keeps the allocator's counts (decides_counts is False)")

    def protected_mask(self, prompt_length: int, budget: int, device: torch.device) -> torch.Tensor:
        """``[L]`` bool: tokens always kept within ``budget``; none by default."""
        return torch.zeros(prompt_length, dtype=torch.bool, device=device)

    def checked_protected_mask(self, prompt_length: int, budget: int, device: torch.device) -> torch.Tensor:
        """:meth:`protected_mask`, refusing more protected tokens than the budget holds.

        Computed once per ``(config, prompt_length, budget, device)``: every layer of a prefill asks for the same
        mask (it is shared: read it, never write it).
        """
        memo = self.__dict__.setdefault("_protected_memo", {})
        key = (self.config, prompt_length, budget, str(device))
        if key not in memo:
            protected = self.protected_mask(prompt_length, budget, device)
            n_protected = int(protected.sum())
            if n_protected > budget:
                raise ConfigError(
                    f"{n_protected} protected tokens ({self!r}) do not fit a budget of {budget} tokens; "
                    "protect fewer tokens (for the built-in selectors: lower sinks/recent or raise the budget)"
                )
            if len(memo) >= 64:  # a long-running evaluation sees many lengths: keep the memo small
                memo.clear()
            memo[key] = protected
        return memo[key]

    def select(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        raise NotImplementedError


PART_BASES: dict[str, type[Part]] = {
    base.kind: base for base in (WindowBuilder, Scorer, Allocator, Selector)
}
