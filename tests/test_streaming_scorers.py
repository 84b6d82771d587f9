"""Expected Attention and KVzip in a progressive prefill: what each round sees, against naive references.

* Expected Attention's running query statistics, added chunk by chunk, are the prompt's mean and covariance;
  with every row held between chunks its last round keeps what a one-pass prefill keeps;
* KVzip's round repeats its own chunk (after the instruction, or the resume cue and the previous ids), and a
  held row keeps the largest attention any round gave it: checked against eager attention of each round's
  prefix + reconstruction, maxed over the rounds.
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from conftest import random_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.parts import Scorer
from kvpress_like.scorers.attention import AttentionConfig, AttentionScorer
from kvpress_like.scorers.expected_attention import QueryMoments
from kvpress_like.windows import ReconstructConfig, ReconstructWindow

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@functools.cache
def _model(attn_implementation: str = "sdpa"):
    return copy.deepcopy(tiny_model("llama", attn_implementation, num_hidden_layers=2, initializer_range=0.1)).double()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 60), cuts=st.lists(st.integers(0, 60), max_size=4), seed=st.integers(0, 99))
def test_query_moments_added_in_pieces_are_the_mean_and_covariance(rows, cuts, seed):
    queries = torch.randn(2, 3, rows, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    moments, bounds = QueryMoments(), sorted({0, rows, *(c for c in cuts if c < rows)})
    for lo, hi in itertools.pairwise(bounds):
        moments.add(queries[:, :, lo:hi])
    moments.add(queries[:, :, :0])  # an empty piece changes nothing
    mean, cov = moments.mean_and_covariance()
    centred = queries - queries.mean(dim=2, keepdim=True)
    torch.testing.assert_close(mean.double(), queries.mean(dim=2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cov.double(), centred.transpose(-1, -2) @ centred / rows, atol=1e-6, rtol=1e-5)
    assert moments.count == rows


@settings(max_examples=10, deadline=None)
@given(length=st.integers(90, 160), chunk=st.integers(25, 60))
def test_expected_attention_holding_every_row_between_chunks_keeps_the_one_pass_tokens(length, chunk):
    model, ids = _model(), random_ids(length, seed=length + chunk)
    one_pass = build("expected_attention", budget="25%").prefill(model, ids)
    progressive = build("expected_attention", budget="25%").prefill(model, ids, prompt_chunk=chunk,
                                                                     interim_factor=length)
    for layer, report in one_pass.report.layers.items():
        assert torch.equal(progressive.report.layers[layer].kept_indices, report.kept_indices)


def _window(**options) -> ReconstructWindow:
    return ReconstructWindow(ReconstructConfig(**{"instruction_ids": (1,), "resume_ids": (7,), "opener_ids": (3,),
                                                  "overlap": 2, **options}))


def test_a_reconstruction_round_repeats_its_own_chunk_after_its_cue_at_positions_after_the_prefix():
    ids = torch.arange(100, 130)[None]
    first = _window(start=2).plan_round(ids[:, :10], chunk_start=0)
    assert first.appended_ids.tolist() == [[1, 3, *range(102, 110)]]  # instruction, opener, tokens 2…9
    later = _window(start=2).plan_round(ids[:, :25], chunk_start=10)
    assert later.appended_ids.tolist() == [[7, 108, 109, 3, *range(110, 125)]]  # resume, 2 previous ids, opener
    assert later.appended_positions.tolist() == [list(range(25, 25 + 19))]
    assert later.window_rows.tolist() == list(range(25, 25 + 19)) and later.prompt_length == 25
    whole = _window(start=2).plan(ids)
    assert torch.equal(_window(start=2).plan_round(ids, chunk_start=0).appended_ids, whole.appended_ids)


def test_a_round_that_ends_before_the_reconstruction_starts_repeats_nothing():
    plan = _window(start=12).plan_round(torch.arange(10)[None], chunk_start=0)
    assert plan.window_rows.numel() == 0 and plan.n_appended == 0 and plan.prompt_length == 10


def test_streaming_kvzip_runs_when_the_first_chunk_ends_before_the_reconstruction_starts():
    """The first chunk takes the remainder: here 5 tokens, inside a 12-token template head."""
    ids = random_ids(85, seed=5)
    pipeline = build("kvzip", budget=20, window={"start": 12})
    result = pipeline.prefill(_model(), ids, prompt_chunk=40)
    assert all(sum(index.numel() for index in report.kept_indices[0]) == 20 * len(report.kept_indices[0])
               for report in result.report.layers.values())


def test_max_attention_scores_merge_by_max_and_others_by_the_newest_round():
    earlier, current = torch.tensor([[[0.5, 0.125]]]), torch.tensor([[[0.25, 0.375]]])
    kvzip = AttentionScorer(AttentionConfig(aggregation="max"))
    snapkv = AttentionScorer(AttentionConfig(aggregation="sum"))
    assert kvzip.merges_rounds and not snapkv.merges_rounds
    assert kvzip.merge_rounds(earlier, current).tolist() == [[[0.5, 0.375]]]
    assert torch.equal(snapkv.merge_rounds(earlier, current), current)


def _naive_streaming_kvzip_scores(ids: torch.Tensor, chunk: int, window: ReconstructWindow) -> dict[int, torch.Tensor]:
    """Per layer ``[kv_heads, L]``: for every round, an eager forward of the prefix and the round's reconstruction;
    a key's score is the largest attention any reconstruction row of any round gives it (max over each group)."""
    model = _model("eager")
    length = ids.shape[1]
    ends = sorted({length - k * chunk for k in range(-(-length // chunk))})
    kv_heads = model.config.num_key_value_heads
    best: dict[int, torch.Tensor] = {}
    starts = [0, *ends[:-1]]
    for chunk_start, end in zip(starts, ends, strict=True):
        plan = window.plan_round(ids[:, :end], chunk_start)
        fed = torch.cat([ids[:, :end], plan.appended_ids], dim=1)
        positions = torch.cat([torch.arange(end)[None], plan.appended_positions], dim=1)
        with torch.no_grad():
            attentions = model(fed, position_ids=positions, output_attentions=True).attentions
        for layer, probs in enumerate(attentions):  # [1, q_heads, rows, rows]
            rows = probs[0, :, end:, :end].amax(dim=1)  # [q_heads, end]
            score = rows.reshape(kv_heads, -1, end).amax(dim=1)
            padded = torch.full((kv_heads, length), -1.0, dtype=score.dtype)
            padded[:, :end] = score
            best[layer] = padded if layer not in best else torch.maximum(best[layer], padded)
    return best


@settings(max_examples=8, deadline=None)
@given(length=st.integers(70, 130), chunk=st.integers(20, 50), budget=st.integers(10, 30))
def test_streaming_kvzip_keeps_the_top_of_every_rounds_largest_attention(length, chunk, budget):
    """Every row held between chunks (interim_factor): the last round ranks each key by the largest attention
    that any round's reconstruction gave it."""
    ids = random_ids(length, seed=length + chunk)
    pipeline = build("kvzip", budget=budget, allocator="uniform")
    result = pipeline.prefill(_model(), ids, prompt_chunk=chunk, interim_factor=length)
    scores = _naive_streaming_kvzip_scores(ids, chunk, pipeline.window)
    for layer, report in result.report.layers.items():
        want = pipeline.selector.select(scores[layer][None].float(), budget)
        assert torch.equal(report.kept_indices, want)


class PositionScorer(Scorer):
    """Scores a chunk's rows by a fixed value of their prompt position and held rows by 0, merging by max: a
    progressive prefill must then keep, per head, the top of those values over the whole prompt (held rows only
    keep their value if their scores follow them through every selection)."""

    name = "position_values"

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values

    @property
    def merges_rounds(self) -> bool:
        return True

    def merge_rounds(self, earlier, current):
        return torch.maximum(earlier, current)

    def score(self, ctx):
        held = ctx.prompt_length - ctx.hidden_states.shape[1] if ctx.prompt_end is not None else 0
        chunk = self.values[:, ctx.hidden_start : ctx.hidden_start + ctx.prompt_length - held]
        return torch.cat([torch.zeros(1, ctx.keys.shape[1], held, dtype=chunk.dtype), chunk[None]], dim=-1)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(60, 140), chunk=st.integers(10, 50), budget=st.integers(4, 30), seed=st.integers(0, 99))
def test_held_rows_carry_their_merged_scores_through_every_rounds_selection(length, chunk, budget, seed):
    model = _model()
    values = torch.rand(model.config.num_key_value_heads, length, generator=torch.Generator().manual_seed(seed))
    pipeline = build("snapkv", budget=budget, selector={"sinks": 0, "recent": 0}, allocator="uniform")
    pipeline.scorer = PositionScorer(values)
    result = pipeline.prefill(model, random_ids(length, seed=seed), prompt_chunk=chunk)
    for report in result.report.layers.values():
        want = values.topk(min(budget, length), dim=-1).indices.sort(dim=-1).values
        assert torch.equal(report.kept_indices[0], want)


def test_merging_rounds_works_on_scores_that_are_views():
    """With gqa="all_heads" the attention scorer returns an expanded view; merging must not write into it."""
    pipeline = build("kvzip", budget=20, scorer={"gqa": "all_heads"})
    result = pipeline.prefill(_model(), random_ids(90, seed=6), prompt_chunk=30)
    assert len(result.report.layers) == _model().config.num_hidden_layers


def test_window_rows_kept_for_a_later_forward_are_copies_not_views_of_the_layer_input():
    """prefill_many runs the prompt, then the appended rows: the union window's prompt rows (one run with the
    pseudo rows) are kept between the two forwards, and must not keep the whole layer input alive."""
    from kvpress_like.compressor import LayerCompressor
    from kvpress_like.parts import WindowPlan

    plan = WindowPlan(10, torch.arange(8, 14), torch.zeros(1, 4, dtype=torch.long), torch.arange(10, 14)[None])
    job = LayerCompressor(plan=plan, target=None, scorer=None, selector=None, allocator=None, budgets={0: 4},
                          report=None, pipeline=None, rope_at=None)
    hidden, cos = torch.randn(1, 10, 8), torch.randn(1, 10, 4)
    job._capture(0, {"hidden_states": hidden, "position_embeddings": (cos, cos)}, start=0)
    (rows, rows_cos, _), = job.captured[0]
    assert rows.shape[1] == 2 and torch.equal(rows, hidden[:, 8:10])
    assert rows.untyped_storage().data_ptr() != hidden.untyped_storage().data_ptr()
    assert rows_cos.untyped_storage().data_ptr() != cos.untyped_storage().data_ptr()


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(0, 40), max_size=12), start=st.integers(0, 40), forward_rows=st.integers(1, 40))
def test_a_window_run_read_as_a_slice_picks_the_rows_the_index_picks(rows, start, forward_rows):
    from kvpress_like.compressor import LayerCompressor
    from kvpress_like.parts import WindowPlan

    window = torch.tensor(rows, dtype=torch.long)
    job = LayerCompressor(plan=WindowPlan(50, window), target=None, scorer=None, selector=None, allocator=None,
                          budgets={}, report=None, pipeline=None, rope_at=None)
    picked = torch.arange(start, start + forward_rows)[job._local_rows(forward_rows, start, "cpu")]
    want = window[(window >= start) & (window < start + forward_rows)]
    assert torch.equal(picked, want)
    assert (job.plan.row_run is not None) == (len(rows) > 0 and rows == list(range(rows[0], rows[0] + len(rows))))
