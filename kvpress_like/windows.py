"""Window builders: which queries judge the importance of the prompt's keys.

* ``suffix`` — the last ``size`` prompt tokens (SnapKV, Li et al. 2024).
* ``pseudo`` — N synthetic tokens appended after the prompt at the positions the first decoded tokens
  will occupy, L … L+N−1 (DapQ, Tian et al. 2026, arXiv 2603.11564, §4.1).
* ``semantic`` — the same synthetic content at positions that do not mirror decoding (the paper's
  "what vs where" ablation, §3.1 and §6.3).
* ``union`` — the suffix window and the pseudo queries together.
* ``question`` — the question's own tokens inside the prompt (query-aware scoring).
* ``prompt`` — every prompt token (accumulated attention, H2O; query statistics, Expected Attention).
* ``reconstruct`` — the prompt repeated after itself, teacher-forced, behind a "repeat the previous
  context" instruction (KVzip, Kim et al. 2025, arXiv 2505.23416, §3.2); chunked, optionally subsampled,
  at KVzip's positions after the prompt or DapQ-style at the first decoding positions.
* ``reaimed`` — the suffix window's queries rotated to the decoding positions L … L+size−1 (no extra rows).
* ``none`` — no queries, for scorers that read only keys/values or positions (StreamingLLM, K-norm).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, NonNegativeInt, model_validator

from kvpress_like.errors import UnsupportedInputError
from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import PartConfig, WindowBuilder, WindowPlan


def last_rows(input_ids: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of the last ``size`` prompt tokens (all of them when the prompt is shorter)."""
    length = input_ids.shape[1]
    return torch.arange(max(0, length - size), length, device=input_ids.device)


class SuffixConfig(PartConfig):
    size: int = Field(32, ge=1, description="number of last prompt tokens whose queries score the keys")


class SuffixWindow(WindowBuilder):
    """The last ``size`` prompt tokens (all of the prompt when it is shorter than ``size``)."""

    name = "suffix"
    summary = "last `size` prompt tokens (SnapKV's observation window)"
    Config = SuffixConfig

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        return WindowPlan(input_ids.shape[1], last_rows(input_ids, self.config.size))


class PseudoContentConfig(PartConfig):
    n_pseudo: int = Field(32, ge=1, description="N, the number of pseudo tokens appended after the prompt")
    content: Literal["prefix_suffix", "random", "repeat"] = Field(
        "prefix_suffix",
        description="prefix_suffix: the first `prefix` and last N-`prefix` prompt ids (paper §5.1); "
        "random: N prompt ids drawn uniformly with `seed`; repeat: N copies of `filler_id` "
        "(default: the prompt's first id), content that copies no prompt span",
    )
    filler_id: int | None = Field(None, ge=0, description="token id repeated by content='repeat'")
    prefix: int = Field(4, ge=0, description="how many leading prompt ids open the pseudo content")
    seed: int = Field(0, description="seed of the `random` content")

    @model_validator(mode="after")
    def _prefix_fits(self):
        if self.prefix > self.n_pseudo:
            raise ValueError(f"prefix ({self.prefix}) cannot exceed n_pseudo ({self.n_pseudo})")
        return self


def pseudo_content(input_ids: torch.Tensor, config: PseudoContentConfig) -> torch.Tensor:
    """The ``[batch, N]`` token ids of the pseudo queries, taken from each row's own prompt.

    Indices wrap around the prompt when it is shorter than the content asks for.
    """
    length = input_ids.shape[1]
    n, m = config.n_pseudo, config.prefix
    if config.content == "repeat":
        filler = input_ids[:, :1] if config.filler_id is None else torch.full_like(input_ids[:, :1], config.filler_id)
        return filler.expand(-1, n).clone()
    if config.content == "prefix_suffix":
        index = torch.cat([torch.arange(m), torch.arange(length - (n - m), length)]) % length
    else:
        generator = torch.Generator().manual_seed(config.seed)
        index = torch.randint(0, length, (n,), generator=generator)
    return input_ids[:, index.to(input_ids.device)]


class PseudoConfig(PseudoContentConfig):
    position_offset: int = Field(
        0, ge=0, description="shift of the pseudo positions past the prompt: L+offset … (0 = the paper)"
    )


class PseudoWindow(WindowBuilder):
    """Position-aware pseudo queries at L+offset … L+offset+N−1 (DapQ §4.1; offset ablation §6.3)."""

    name = "pseudo"
    summary = "N pseudo tokens at the future decoding positions L … L+N-1 (DapQ)"
    Config = PseudoConfig

    def first_position(self, prompt_length: int) -> int:
        return prompt_length + self.config.position_offset

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        batch, length = input_ids.shape
        n = self.config.n_pseudo
        start = self.first_position(length)
        positions = torch.arange(start, start + n, device=input_ids.device).expand(batch, n)
        rows = torch.arange(length, length + n, device=input_ids.device)
        return WindowPlan(length, rows, pseudo_content(input_ids, self.config), positions)


class SemanticConfig(PseudoContentConfig):
    position_start: int = Field(
        0, ge=0, description="first position id of the pseudo tokens (default 0 … N-1, not the decoding ones)"
    )


class SemanticWindow(PseudoWindow):
    """DapQ's pseudo content with positions that do not mirror decoding (ablation of §3.1 / §6.3)."""

    name = "semantic"
    summary = "DapQ's pseudo content at positions position_start … (not the decoding positions)"
    Config = SemanticConfig

    def first_position(self, prompt_length: int) -> int:
        return self.config.position_start


class QuestionWindow(WindowBuilder):
    """The question's tokens, which sit inside the prompt (needs the question's span)."""

    name = "question"
    summary = "the question's own tokens inside the prompt (needs question_span)"

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        length = input_ids.shape[1]
        if question_span is None:
            raise UnsupportedInputError(
                "the 'question' window needs the question's token span: pass question_span=(start, end) "
                "to Pipeline.prefill, or call Pipeline.generate with a question and question_aware=True"
            )
        start, end = question_span
        if not (0 <= start < end <= length):
            raise UnsupportedInputError(
                f"question_span {question_span} must satisfy 0 <= start < end <= prompt length ({length})"
            )
        return WindowPlan(length, torch.arange(start, end, device=input_ids.device))


class UnionConfig(PseudoConfig):
    size: int = Field(32, ge=1, description="last prompt tokens joined to the pseudo queries")


class UnionWindow(PseudoWindow):
    """The suffix window and the pseudo queries together: recent real queries plus decoding-aligned ones."""

    name = "union"
    summary = "last `size` prompt tokens + DapQ's pseudo queries"
    Config = UnionConfig

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        pseudo = super().plan(input_ids, question_span)
        rows = torch.cat([last_rows(input_ids, self.config.size), pseudo.window_rows])
        return WindowPlan(pseudo.prompt_length, rows, pseudo.appended_ids, pseudo.appended_positions)


class PromptWindow(WindowBuilder):
    """Every prompt token is a query (H2O's accumulated attention, Expected Attention's statistics)."""

    name = "prompt"
    summary = "every prompt token (H2O, Expected Attention)"

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        return WindowPlan(input_ids.shape[1], torch.arange(input_ids.shape[1], device=input_ids.device))


class ReconstructConfig(PartConfig):
    instruction_ids: tuple[NonNegativeInt, ...] = Field(
        (), description="ids fed before the first chunk (KVzip: 'Repeat the previous context exactly.'; parts see "
        "no tokenizer: kvpress_like.methods.kvzip.kvzip_window makes them)",
    )
    resume_ids: tuple[NonNegativeInt, ...] = Field(
        (), description="ids fed before every later chunk, then the previous chunk's last `overlap` prompt ids "
        "(KVzip: 'Repeat the part of the previous context exactly, starting with')",
    )
    opener_ids: tuple[NonNegativeInt, ...] = Field(
        (), description="ids fed right before each chunk's tokens (KVzip: the chat template's assistant opener)"
    )
    overlap: int = Field(8, ge=0, description="prompt ids of the previous chunk repeated after `resume_ids`")
    start: int = Field(0, ge=0, description="first prompt token repeated (e.g. after a template head)")
    chunk_size: int = Field(2048, ge=1, description="prompt tokens per reconstruction chunk (KVzip: 2048)")
    positions: Literal["after", "decoding"] = Field(
        "after", description="after: row r of the reconstruction at L+r (KVzip); decoding: the window's rows cycle "
        "through the first `span` decoding positions L … L+span-1 (DapQ's alignment, Tian et al. 2026)",
    )
    span: int = Field(32, ge=1, description="decoding positions the rows cycle through (positions='decoding')")
    period: int = Field(1, ge=1, description="subsampling: of prompt token j only those with j mod period < keep "
                        "are repeated (1 = the whole prompt, as KVzip)")
    keep: int = Field(1, ge=1, description="consecutive prompt tokens repeated out of every `period`")

    @model_validator(mode="after")
    def _keep_fits(self):
        if self.keep > self.period:
            raise ValueError(f"keep ({self.keep}) cannot exceed period ({self.period})")
        return self


class ReconstructWindow(WindowBuilder):
    """The prompt repeated after itself: KVzip's context reconstruction (Kim et al. 2025, arXiv 2505.23416).

    The prompt from ``start`` on is cut into chunks of ``chunk_size`` tokens; the first chunk follows
    ``instruction_ids``, every later one ``resume_ids`` and the previous chunk's last ``overlap`` ids, then
    ``opener_ids``; all teacher-forced. Every appended row is a window query. With ``period > 1`` only the prompt tokens
    ``j mod period < keep`` are repeated (the instruction rows always are): a partial reconstruction that
    costs ``keep / period`` of the rows. Positions: ``after`` keeps each row where the full reconstruction
    puts it (L + its index in it, gaps included), ``decoding`` lets the rows cycle through L … L+span−1.
    A progressive prefill's round repeats its own chunk (:meth:`plan_round`), so the window streams.
    """

    name = "reconstruct"
    summary = "the prompt repeated after a 'repeat the context' instruction, chunked (KVzip)"
    Config = ReconstructConfig

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        if self.config.start >= input_ids.shape[1]:
            raise UnsupportedInputError(
                f"the 'reconstruct' window repeats the prompt from token {self.config.start} on, but the prompt has "
                f"only {input_ids.shape[1]} tokens; lower `start`"
            )
        return self._reconstruction(input_ids, self.config.start)

    def plan_round(
        self, prefix_ids: torch.Tensor, chunk_start: int, question_span: tuple[int, int] | None = None
    ) -> WindowPlan:
        """A progressive prefill's round repeats its own chunk only (after the instruction if the chunk holds
        token ``start``, else after the resume cue and the previous ``overlap`` ids), as KVzip's chunks. A round
        that ends before ``start`` (a template head) repeats nothing: no window rows."""
        first = max(self.config.start, chunk_start)
        if first >= prefix_ids.shape[1]:
            return WindowPlan(prefix_ids.shape[1], torch.zeros(0, dtype=torch.long, device=prefix_ids.device))
        return self._reconstruction(prefix_ids, first)

    def _reconstruction(self, input_ids: torch.Tensor, first_token: int) -> WindowPlan:
        """The prompt from ``first_token`` on, repeated in chunks after their cues, at positions after the prompt."""
        batch, length = input_ids.shape
        config, device = self.config, input_ids.device

        def constant(ids: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.long, device=device).expand(batch, -1)

        pieces, repeated = [], []
        for first in range(first_token, length, config.chunk_size):
            if first == config.start:
                cue = constant(config.instruction_ids)
            else:
                tail = input_ids[:, max(config.start, first - config.overlap) : first]
                cue = torch.cat([constant(config.resume_ids), tail], dim=1)
            cue = torch.cat([cue, constant(config.opener_ids)], dim=1)
            tokens = torch.arange(first, min(first + config.chunk_size, length), device=device)
            pieces += [cue, input_ids[:, tokens]]
            sampled = tokens % config.period < config.keep
            repeated += [torch.ones(cue.shape[1], dtype=torch.bool, device=device), sampled]
        fed = torch.cat(repeated)
        ids = torch.cat(pieces, dim=1)[:, fed]
        n = ids.shape[1]
        if config.positions == "after":
            positions = length + torch.arange(fed.numel(), device=device)[fed]
        else:
            positions = length + torch.arange(n, device=device) % config.span
        rows = torch.arange(length, length + n, device=device)
        return WindowPlan(length, rows, ids, positions.expand(batch, n))


class ReaimedWindow(WindowBuilder):
    """The last ``size`` prompt queries, re-aimed: rotated ``size`` positions later, to L … L+size−1.

    DapQ (Tian et al. 2026, arXiv 2603.11564, §3.1) finds that *where* the scoring queries sit matters more
    than *what* they say. This window keeps the real content of SnapKV's window and moves it to DapQ's
    positions with RoPE alone (a rotation by ``size`` positions), so it needs no appended rows and no extra
    forward: the test of whether position alone carries DapQ's gain. Not in either paper.
    """

    name = "reaimed"
    summary = "last `size` prompt queries rotated to the decoding positions L … L+size-1 (no extra rows)"
    Config = SuffixConfig

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        rows = last_rows(input_ids, self.config.size)
        return WindowPlan(input_ids.shape[1], rows, query_shift=int(rows.numel()))


class NoWindow(WindowBuilder):
    """No queries: the scorer reads keys, values or positions only."""

    name = "none"
    summary = "no queries (scorers that need none: StreamingLLM, K-norm, random)"

    def plan(self, input_ids: torch.Tensor, question_span: tuple[int, int] | None = None) -> WindowPlan:
        return WindowPlan(input_ids.shape[1], torch.zeros(0, dtype=torch.long, device=input_ids.device))


@hookimpl
def register_window_builders():
    return [
        SuffixWindow, PseudoWindow, SemanticWindow, UnionWindow, QuestionWindow, PromptWindow, ReconstructWindow,
        ReaimedWindow, NoWindow,
    ]
