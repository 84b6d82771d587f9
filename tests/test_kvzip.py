"""KVzip's parts: the ``reconstruct`` window, the blocked ``max`` attention score, the ``global`` allocator,
their ragged caches, and the multi-question evaluation (one compressed cache, several questions)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.allocators import (
    AcrossHeadsAllocator,
    AcrossLayersAllocator,
    HeadAdaptiveAllocator,
    HeadAdaptiveConfig,
)
from kvpress_like.errors import ConfigError, UnsupportedInputError
from kvpress_like.eval.engine import Candidate, evaluate_sample, reference_pipeline
from kvpress_like.eval.protocols import prepare
from kvpress_like.eval.tasks import Sample, make_samples
from kvpress_like.eval.toy import byte_tokenizer, toy_model
from kvpress_like.methods.kvzip import INSTRUCTION, kvzip_window
from kvpress_like.parts import LayerContext
from kvpress_like.prefill import feed, prefill_many
from kvpress_like.ragged import RaggedLayer
from kvpress_like.scorers import attention
from kvpress_like.scorers.attention import AttentionConfig, attention_scores
from kvpress_like.windows import ReconstructWindow

# ---------------------------------------------------------------------------------------------
# The reconstruct window
# ---------------------------------------------------------------------------------------------


def plan(length: int, batch: int = 1, **options):
    ids = torch.arange(1000, 1000 + batch * length).reshape(batch, length)
    return ids, ReconstructWindow(ReconstructWindow.Config(**options)).plan(ids)


def test_one_chunk_is_instruction_opener_and_prompt_after_it():
    ids, p = plan(10, instruction_ids=[1, 2], opener_ids=[3], start=2)
    assert p.appended_ids.tolist() == [[1, 2, 3, *ids[0, 2:].tolist()]]
    assert p.appended_positions.tolist() == [list(range(10, 21))]
    assert p.window_rows.tolist() == list(range(10, 21))  # every appended row is a query
    assert p.prompt_length == 10


def test_later_chunks_resume_after_the_previous_chunks_tail():
    ids, p = plan(10, instruction_ids=[1], resume_ids=[7], opener_ids=[3], chunk_size=4, overlap=2)
    row = ids[0].tolist()
    assert p.appended_ids[0].tolist() == [1, 3, *row[0:4], 7, *row[2:4], 3, *row[4:8], 7, *row[6:8], 3, *row[8:10]]
    assert p.appended_positions[0].tolist() == list(range(10, 10 + p.n_appended))


def test_subsampling_keeps_positions_of_the_full_reconstruction():
    _, full = plan(12, instruction_ids=[1, 2])
    ids, part = plan(12, instruction_ids=[1, 2], period=4, keep=2)
    repeated = [j for j in range(12) if j % 4 < 2]
    assert part.appended_ids[0].tolist() == [1, 2, *ids[0, repeated].tolist()]
    assert part.appended_positions[0].tolist() == [12, 13, *[14 + j for j in repeated]]
    assert set(part.appended_positions[0].tolist()) <= set(full.appended_positions[0].tolist())


def test_decoding_positions_cycle_through_the_first_decoding_positions():
    _, p = plan(40, batch=2, positions="decoding", span=8, instruction_ids=[5])
    assert p.appended_positions.shape == (2, 41)
    assert p.appended_positions[0].tolist() == [40 + i % 8 for i in range(41)]


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 90), chunk=st.integers(1, 40), period=st.integers(1, 6), keep=st.integers(1, 6),
       start=st.integers(0, 89), overlap=st.integers(0, 5), n_instruction=st.integers(0, 3),
       n_resume=st.integers(0, 3), positions=st.sampled_from(["after", "decoding"]))
def test_reconstruct_plan_invariants(length, chunk, period, keep, start, overlap, n_instruction, n_resume, positions):
    keep, start = min(keep, period), min(start, length - 1)
    _, p = plan(length, batch=2, chunk_size=chunk, period=period, keep=keep, start=start, overlap=overlap,
                  instruction_ids=[1] * n_instruction, resume_ids=[2] * n_resume, positions=positions)
    chunks = -(-(length - start) // chunk)
    cues = n_instruction + sum(n_resume + min(overlap, c * chunk) for c in range(1, chunks))
    repeated = sum(1 for j in range(start, length) if j % period < keep)
    assert p.n_appended == cues + repeated
    assert p.window_rows.tolist() == list(range(length, length + p.n_appended))
    assert torch.equal(p.appended_positions[0], p.appended_positions[1])
    if positions == "after":
        positions_0 = p.appended_positions[0]
        assert bool((positions_0.diff() > 0).all()) and bool((positions_0 >= length).all())
    else:
        assert bool((p.appended_positions >= length).all()) and bool((p.appended_positions < length + 32).all())


def test_bad_reconstruct_options_are_refused_clearly():
    with pytest.raises(ConfigError, match="keep"):
        build("kvzip", budget=10, window={"period": 2, "keep": 3})
    with pytest.raises(ConfigError, match="instruction_ids"):
        build("kvzip", budget=10, window={"instruction_ids": [-1]})
    with pytest.raises(UnsupportedInputError, match="lower `start`"):
        plan(5, start=5)


def test_kvzip_window_tokenises_the_instruction_and_skips_the_template_head(smollm2_tokenizer):
    options = kvzip_window(smollm2_tokenizer)
    assert smollm2_tokenizer.decode(options["instruction_ids"]) == INSTRUCTION
    assert smollm2_tokenizer.decode(options["opener_ids"]).endswith("assistant\n")
    assert smollm2_tokenizer.decode(options["resume_ids"]).endswith("starting with")
    assert options["start"] > 0
    build("kvzip", budget="20%", window=options)  # valid options


def test_kvzip_window_without_chat_template_opens_with_a_newline():
    tokenizer = byte_tokenizer()
    options = kvzip_window(tokenizer, context_start=False)
    assert tokenizer.decode(options["opener_ids"]) == "\n" and "start" not in options


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from kvpress_like.eval.distributed import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except Exception as error:  # the embedded model's package is optional
        pytest.skip(f"SmolLM2 tokenizer unavailable: {error}")


# ---------------------------------------------------------------------------------------------
# The attention scorer's max aggregation, scored block by block
# ---------------------------------------------------------------------------------------------


def context(window: int, total: int, prompt: int, seed: int = 0, q_heads: int = 6, kv_heads: int = 2) -> LayerContext:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.sort(torch.randperm(total, generator=generator)[:window]).values
    return LayerContext(
        layer_idx=0, module=None, queries=torch.randn(1, q_heads, window, 8, generator=generator),
        keys=torch.randn(1, kv_heads, total, 8, generator=generator), values=torch.randn(1, kv_heads, total, 8),
        query_rows=rows, prompt_length=prompt, scaling=8**-0.5, hidden_states=None, rope_at=None,
    )


def naive_scores(ctx: LayerContext, how: str, gqa: str) -> torch.Tensor:
    """Per query row, per query head: causal softmax over every visible key; then max/sum/mean and GQA."""
    q_heads, kv_heads = ctx.queries.shape[1], ctx.keys.shape[1]
    group = q_heads // kv_heads
    per_head = torch.zeros(q_heads, ctx.prompt_length, dtype=torch.float64)
    for h in range(q_heads):
        rows = []
        for i, row in enumerate(ctx.query_rows.tolist()):
            keys = ctx.keys[0, h // group, : row + 1].double()
            probs = (keys @ ctx.queries[0, h, i].double() * ctx.scaling).softmax(-1)
            rows.append(torch.nn.functional.pad(probs, (0, ctx.keys.shape[2] - row - 1))[: ctx.prompt_length])
        stacked = torch.stack(rows)
        per_head[h] = {"max": stacked.amax(0), "sum": stacked.sum(0), "mean": stacked.mean(0)}[how]
    grouped = per_head.reshape(kv_heads, group, -1)
    return (grouped.amax(1) if gqa == "max" else grouped.mean(1))[None]


@settings(max_examples=40, deadline=None)
@given(window=st.integers(1, 30), extra=st.integers(0, 20), prompt=st.integers(1, 30), block=st.integers(1, 40),
       how=st.sampled_from(["max", "sum", "mean"]), gqa=st.sampled_from(["max", "mean"]), seed=st.integers(0, 99))
def test_blocked_attention_scores_equal_the_naive_scores(window, extra, prompt, block, how, gqa, seed):
    total = max(window, prompt) + extra
    ctx = context(window, total, prompt, seed)
    config = AttentionConfig(aggregation=how, gqa=gqa, block=block)
    torch.testing.assert_close(attention_scores(ctx, config).double(), naive_scores(ctx, how, gqa), atol=1e-5,
                               rtol=1e-4)


def test_scoring_holds_one_block_of_queries_at_a_time(monkeypatch):
    seen = []
    original = attention.window_attention

    def spy(ctx, domain="visible"):
        seen.append(ctx.queries.shape[2])
        return original(ctx, domain)

    monkeypatch.setattr(attention, "window_attention", spy)
    ctx = context(window=100, total=150, prompt=50)
    attention_scores(ctx, AttentionConfig(aggregation="max", block=16))
    assert max(seen) == 16 and sum(seen) == 100


def test_scoring_steps_stay_under_the_entry_bound_when_the_keys_are_many(monkeypatch):
    seen = []
    original = attention.window_attention

    def spy(ctx, domain="visible"):
        seen.append(ctx.queries.shape[0] * ctx.queries.shape[1] * ctx.queries.shape[2] * ctx.keys.shape[2])
        return original(ctx, domain)

    ctx = context(window=100, total=150, prompt=50)
    full = attention_scores(ctx, AttentionConfig(aggregation="max", block=256))
    monkeypatch.setattr(attention, "STEP_ENTRIES", 2 * ctx.queries.shape[1] * 150 * 7)  # 14 rows of 150 keys
    monkeypatch.setattr(attention, "window_attention", spy)
    bounded = attention_scores(ctx, AttentionConfig(aggregation="max", block=256))
    assert len(seen) == 8 and max(seen) <= attention.STEP_ENTRIES  # ceil(100 / 14) steps
    assert torch.equal(bounded, full)


def test_default_attention_scores_are_unchanged():
    """Windows up to the default block are scored in one piece: exactly the previous formula."""
    ctx = context(window=32, total=90, prompt=60, seed=3)
    probs = attention.window_attention(ctx)
    expected = attention.pool_before_window(probs.sum(dim=3).mean(dim=2), ctx, "none", 7)
    assert torch.equal(attention_scores(ctx, AttentionConfig()), expected)
    assert AttentionConfig().aggregation == "sum" and AttentionConfig().block == 256


# ---------------------------------------------------------------------------------------------
# The global allocator
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 4), length=st.integers(2, 40), budget=st.integers(1, 40), sinks=st.integers(0, 3),
       seed=st.integers(0, 99))
def test_global_allocator_is_one_top_k_over_the_layer(heads, length, budget, sinks, seed):
    budget, sinks = min(budget, length), min(sinks, budget, length)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, heads, length, generator=generator)
    protected = torch.arange(length) < sinks
    counts = AcrossHeadsAllocator().head_budgets(scores, budget, protected)
    assert counts.sum(-1).tolist() == [heads * budget] * 2
    assert bool((counts >= sinks).all()) and bool((counts <= length).all())
    for b in range(2):  # each head's count = its entries among the layer's best heads × budget
        ranked = scores[b].masked_fill(protected, float("inf")).flatten()
        winners = ranked.topk(heads * budget).indices // length
        assert counts[b].tolist() == torch.bincount(winners, minlength=heads).tolist()
    same = HeadAdaptiveAllocator(HeadAdaptiveConfig(alpha=0.0)).head_budgets(scores, budget, protected)
    assert torch.equal(counts, same)


def test_kvzip_cache_holds_exactly_the_kept_entries():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(4))
    result = build("kvzip", budget=30).prefill(model, ids)
    assert all(isinstance(layer, RaggedLayer) for layer in result.cache.layers)
    counts = [layer.kept_counts for layer in result.report.layers.values()]
    assert any(len(set(c.flatten().tolist())) > 1 for c in counts), "KVzip's heads should keep different counts"
    assert all(int(c.sum()) == 30 * model.config.num_key_value_heads for c in counts)
    entry_bytes = 2 * model.config.head_dim * 4
    assert result.report.cache_bytes_after == sum(int(c.sum()) for c in counts) * entry_bytes
    for layer in result.report.layers.values():  # the 4 sinks are kept by every head
        assert bool(layer.kept_mask(90)[..., :4].all())
    logits = feed(model, result.cache, torch.randint(0, 256, (1, 5)))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# The model-wide allocator (KVzip's default: one ranking over every layer)
# ---------------------------------------------------------------------------------------------


def naive_model_counts(scores: dict, budgets: dict, protected: dict) -> dict:
    """Sort every (score, layer, head, token) of one sequence; the best Σ heads × budget win."""
    entries = []
    for layer, s in scores.items():
        for h in range(s.shape[1]):
            for t in range(s.shape[2]):
                entries.append((float("inf") if protected[layer][t] else float(s[0, h, t]), layer, h))
    heads = next(iter(scores.values())).shape[1]
    entries.sort(key=lambda e: -e[0])
    counts = {layer: [0] * heads for layer in scores}
    for _, layer, h in entries[: heads * sum(budgets.values())]:
        counts[layer][h] += 1
    return counts


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 4), heads=st.integers(1, 3), length=st.integers(4, 30), budget=st.integers(1, 30),
       sinks=st.integers(0, 3), seed=st.integers(0, 99))
def test_model_wide_allocator_is_one_top_k_over_every_layer(layers, heads, length, budget, sinks, seed):
    budget, sinks = min(budget, length), min(sinks, budget)
    generator = torch.Generator().manual_seed(seed)
    scores = {i: torch.rand(1, heads, length, generator=generator) for i in range(layers)}
    protected = {i: torch.arange(length) < sinks for i in range(layers)}
    budgets = dict.fromkeys(range(layers), budget)
    counts = AcrossLayersAllocator().model_head_budgets(scores, budgets, protected)
    assert {i: c[0].tolist() for i, c in counts.items()} == naive_model_counts(scores, budgets, protected)
    assert all(bool((c >= sinks).all()) for c in counts.values())


def test_a_model_wide_prefill_scores_like_the_per_layer_one_and_keeps_the_top_of_all_layers(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(6))
    seen = {}
    original = AcrossLayersAllocator.model_head_budgets

    def spy(self, scores, budgets, protected):
        seen.update(scores=scores, budgets=budgets, protected=protected)
        return original(self, scores, budgets, protected)

    monkeypatch.setattr(AcrossLayersAllocator, "model_head_budgets", spy)
    result = build("kvzip", budget=20, allocator="global_layers").prefill(model, ids)
    per_layer = build("kvzip", budget=20).prefill(model, ids)  # the same scorer, pruning layer by layer
    expected = naive_model_counts(seen["scores"], seen["budgets"], seen["protected"])
    heads = model.config.num_key_value_heads
    assert sum(sum(c) for c in expected.values()) == 3 * 20 * heads
    assert len({tuple(c) for c in expected.values()}) > 1, "the layers should keep different numbers of tokens"
    for layer, report in result.report.layers.items():
        assert report.kept_counts[0].tolist() == expected[layer]
        scores = seen["scores"][layer][0].masked_fill(seen["protected"][layer], float("inf"))
        for h, count in enumerate(expected[layer]):  # each head keeps its own best `count`
            want = set(scores[h].topk(count).indices.tolist()) if count else set()
            assert set(report.kept_mask(70)[0, h].nonzero().flatten().tolist()) == want
        # same scores as the per-layer allocation: its heads' counts come from the same ranking within the layer
        same = AcrossHeadsAllocator().head_budgets(seen["scores"][layer], 20, seen["protected"][layer])
        assert torch.equal(per_layer.report.layers[layer].kept_counts, same)
    entry_bytes = 2 * model.config.head_dim * 4
    assert result.report.cache_bytes_after == 3 * 20 * heads * entry_bytes
    full_prompt_cache = 3 * 70 * heads * entry_bytes
    assert result.report.peak_cache_bytes >= full_prompt_cache  # it holds every layer until the ranking: said so
    assert torch.isfinite(feed(model, result.cache, torch.randint(0, 256, (1, 4)))).all()


def test_model_wide_allocation_keeps_the_same_in_prefill_many_as_alone():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(7))
    pipelines = [build("kvzip", budget=b, allocator="global_layers") for b in (10, 25)]
    pipelines.append(build("snapkv", budget=40, allocator="global_layers"))  # a window inside the prompt
    together = prefill_many(model, ids, pipelines)
    for pipeline, shared in zip(pipelines, together, strict=True):
        alone = pipeline.prefill(model, ids)
        for layer, report in alone.report.layers.items():
            assert torch.equal(report.kept_mask(60), shared.report.layers[layer].kept_mask(60))
        assert shared.report.cache_bytes_after == alone.report.cache_bytes_after


def test_a_failing_model_wide_selection_names_its_layer_and_returns_nothing(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(9))
    pipeline = build("kvzip", budget=10, allocator="global_layers")

    def broken(scores, budget):
        raise RuntimeError("selector broke")

    monkeypatch.setattr(pipeline.selector, "select", broken)
    pipeline.last_report = None
    with pytest.raises(RuntimeError, match="selector broke") as caught:
        pipeline.prefill(model, ids)
    assert any("failed on layer 0 (model-wide selection)" in note for note in caught.value.__notes__)
    assert pipeline.last_report is None


def test_model_wide_allocation_is_refused_where_it_cannot_rank_every_layer():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(8))
    pipeline = build("kvzip", budget=10, allocator="global_layers")
    with pytest.raises(UnsupportedInputError, match="'global_layers' allocator ranks every layer"):
        pipeline.prefill(model, ids[:1], prompt_chunk=16)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(UnsupportedInputError, match="left-padded batch does not support: prefill these sequences one"):
        pipeline.prefill(model, ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------
# The reconstruction runs once per prompt, whatever the number of budgets
# ---------------------------------------------------------------------------------------------


def test_prefill_many_reconstructs_once_for_every_budget_and_keeps_what_each_keeps_alone():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(5))
    pipelines = [reference_pipeline()] + [build("kvzip", budget=b) for b in (10, 25, 40)]
    pipelines += [build("kvzip", budget=25, allocator="uniform"), build("dapq", budget=20)]
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        shared = prefill_many(model, ids, pipelines)
    finally:
        handle.remove()
    assert len(forwards) == 3  # the prompt, one reconstruction for the four kvzip pipelines, dapq's pseudo rows
    for pipeline, got in zip(pipelines, shared, strict=True):
        alone = pipeline.prefill(model, ids).report
        for layer, report in alone.layers.items():
            assert torch.equal(got.report.layers[layer].kept_mask(80), report.kept_mask(80))
        assert got.report.cache_bytes_after == alone.cache_bytes_after


# ---------------------------------------------------------------------------------------------
# Several questions about one compressed context
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return toy_model(seed=3), byte_tokenizer()


def test_ask_all_adds_a_question_per_key(toy):
    tokenizer = toy[1]
    plain = make_samples(tokenizer, "multi_key", 300, 1, seed=2)[0]
    asked = make_samples(tokenizer, "multi_key", 300, 1, seed=2, ask_all=True)[0]
    questions = asked.questions()
    assert plain.questions() == [plain]
    assert [q.answers for q in questions] == [plain.answers] + [[v] for v in plain.meta["distractors"].values()]
    assert len({q.question for q in questions}) == 4 and all(q.context == plain.context for q in questions)
    assert all("followups" not in q.meta for q in questions)
    values = make_samples(tokenizer, "multi_value", 400, 1, seed=2, n_keys=2, n_values=2, ask_all=True)[0]
    (first, second) = values.questions()
    assert first.meta["key"] != second.meta["key"] and all(a in values.context for a in first.answers + second.answers)
    assert make_samples(tokenizer, "multi_value", 400, 1, seed=2)[0].meta.get("other_keys") is None


def test_bad_followups_are_refused():
    sample = Sample(task="mine", context="c", question="q", answers=["a"], meta={"followups": [{"question": "x"}]})
    with pytest.raises(ConfigError, match="needs \"question\" and \"answers\""):
        sample.questions()


def test_one_compression_answers_every_question_like_separate_runs(toy):
    model, tokenizer = toy
    sample = make_samples(tokenizer, "multi_key", 260, 1, seed=7, ask_all=True)[0]

    def candidates():
        return [Candidate("kvzip", "40%", build("kvzip", budget="40%")), Candidate("snapkv", "40%", build("snapkv",
                budget="40%")), Candidate("kvzip", "60%", build("kvzip", budget="60%"))]

    shared = evaluate_sample(model, tokenizer, sample, "query_agnostic", candidates(), attention_metrics=False)
    results = [shared, *shared.followups]
    assert len(results) == 4
    for question, result in zip(sample.questions(), results, strict=True):
        alone = evaluate_sample(model, tokenizer, question, "query_agnostic", candidates(), attention_metrics=False)
        assert result.reference["answer"] == alone.reference["answer"]
        assert [r["answer"] for r in result.rows] == [r["answer"] for r in alone.rows]
        assert prepare(tokenizer, question, "query_agnostic").compress_length == result.reference["compressed_tokens"]
    aware = evaluate_sample(model, tokenizer, sample, "question_aware", candidates()[:1], attention_metrics=False)
    assert len(aware.followups) == 3


def test_followup_records_become_cells_of_their_own(toy):
    from kvpress_like.eval.records import merge_cells
    from kvpress_like.eval.summary import aggregate

    record = {"cell": "multi_key|300|query_agnostic|0", "task": "multi_key", "length": 300,
              "protocol": "query_agnostic", "question": 0, "reference": {"correct": True, "prefill_seconds": 2.0},
              "rows": [{"label": "kvzip", "budget": "10%", "correct": False, "compress_seconds": 2.0, "error": None}],
              "followups": [{"question": 1, "reference": {"correct": True, "prefill_seconds": 2.0},
                             "rows": [{"label": "kvzip", "budget": "10%", "correct": True, "compress_seconds": 2.0,
                                       "error": None}]}]}
    cells = merge_cells([record])
    assert sorted(cells) == ["multi_key|300|query_agnostic|0", "multi_key|300|query_agnostic|0|q1"]
    table, _ = aggregate([record])
    rows = {(r["task"], r["method"]): r for r in table}
    assert rows[("multi_key", "kvzip")]["n"] == 2 and rows[("multi_key", "kvzip")]["accuracy"] == 0.5
    assert rows[("multi_key_q1", "kvzip")]["accuracy"] == 1.0 and rows[("multi_key_q0", "kvzip")]["accuracy"] == 0.0
    assert rows[("multi_key", "kvzip")]["cost"] == 2.0

