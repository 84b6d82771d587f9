"""The pipeline against a naive, independent implementation of DapQ (and SnapKV-style windows).

The reference shares no code with the library: it runs the *uncompressed* model once, under eager
attention, with ``output_attentions=True`` on the prompt followed by the window tokens, takes the
model's own full attention matrices, and follows the paper (arXiv 2603.11564 §4, Eq. 4–5):

* pseudo content = first 4 + last 28 prompt ids, at positions L … L+31 (a plain forward of the
  concatenation gives exactly these positions);
* score(j) = Σ over the 32 pseudo rows of the softmax attention on prompt key j (causal softmax over
  everything the row sees, the default ``softmax_domain="visible"``);
* GQA: mean over the query heads of each KV group; top-k per KV head; indices sorted.

The pipeline runs on the default ``sdpa`` model (same weights) and recomputes post-RoPE queries from
hidden states; float32 rounding can only flip tokens whose score is within 1e-5 (relative) of the
cut-off (see ``assert_topk_matches``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import GQA_SHAPES, assert_topk_matches, full_attention_layers, random_ids, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvpress_like import build

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Gemma3: only its global (full-attention) layers are compressed; Phi3 with partial rotary embeddings.
REFERENCE_ARCHS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "gemma3": {},
    "mistral": {},
    "phi3": {"partial_rotary_factor": 0.5},
}


@torch.no_grad()
def reference_attention(model, ids: torch.Tensor, appended: torch.Tensor | None = None,
                        appended_positions: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Full eager attention matrices ``[B, H, T, T]`` of one uncompressed forward, per layer."""
    length = ids.shape[1]
    full = ids if appended is None else torch.cat([ids, appended], dim=1)
    kwargs = {}
    if appended_positions is not None:
        positions = torch.cat([torch.arange(length), appended_positions])[None]
        # a cache disables transformers' packed-sequence detection (positions that restart at 0)
        kwargs = {"position_ids": positions, "cache": DynamicCache(config=model.config), "use_cache": True}
    out = model(input_ids=full, output_attentions=True, **kwargs)
    return dict(enumerate(out.attentions))


def window_scores(attn: torch.Tensor, rows: slice, length: int, kv_heads: int, *, gqa: str = "mean",
                  domain: str = "visible") -> torch.Tensor:
    """Σ over window rows of the attention on prompt columns, reduced over each KV group: ``[B, kvh, L]``."""
    probs = attn[:, :, rows, :].double()
    if domain == "prompt":  # softmax restricted to prompt keys = renormalised prompt columns
        probs = probs[..., :length] / probs[..., :length].sum(-1, keepdim=True)
    per_head = probs[..., :length].sum(dim=2)  # [B, H, L]
    batch, heads, _ = per_head.shape
    grouped = per_head.reshape(batch, kv_heads, heads // kv_heads, length)
    return grouped.mean(dim=2) if gqa == "mean" else grouped.amax(dim=2)


def avg_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Zero-padded moving average along the key axis (SnapKV's avg_pool1d, count_include_pad)."""
    if scores.shape[-1] == 0:
        return scores
    pad = kernel // 2
    return F.pad(scores, (pad, pad)).unfold(-1, kernel, 1).mean(-1)


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    pad = kernel // 2
    return F.pad(scores, (pad, pad), value=float("-inf")).unfold(-1, kernel, 1).amax(-1)


def reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def _models(arch: str, heads: int, kv_heads: int, init: float):
    overrides = {**REFERENCE_ARCHS[arch], "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                 "initializer_range": init}
    return tiny_model(arch, "sdpa", **overrides), tiny_model(arch, "eager", **overrides)


def _compare(pipeline_kept: dict[int, torch.Tensor], model, ref_scores: dict[int, torch.Tensor], k: int):
    layers = full_attention_layers(model)
    assert sorted(pipeline_kept) == layers
    exact = 0
    for layer in layers:
        kept = pipeline_kept[layer]
        assert kept.shape == (*ref_scores[layer].shape[:2], k)
        assert_topk_matches(kept, ref_scores[layer])
        exact += torch.equal(kept, reference_topk(ref_scores[layer], k))
    return exact


common = dict(
    gqa=st.sampled_from(GQA_SHAPES),
    init=st.sampled_from([0.02, 0.3]),
    length=st.integers(32, 100),
    batch=st.integers(1, 2),
    data=st.data(),
)


@pytest.mark.parametrize("arch", sorted(REFERENCE_ARCHS))
@SETTINGS
@given(**common)
def test_dapq_matches_naive_reference(arch, gqa, init, length, batch, data):
    sdpa_model, eager_model = _models(arch, *gqa, init)
    budget = data.draw(st.integers(1, length - 1), label="budget")
    ids = random_ids(length, batch=batch, seed=length + batch)
    pseudo = torch.cat([ids[:, :4], ids[:, -28:]], dim=1)  # first 4 + last 28 prompt ids
    attn = reference_attention(eager_model, ids, pseudo)  # positions L … L+31
    kv_heads = eager_model.config.num_key_value_heads
    ref = {i: window_scores(a, slice(length, length + 32), length, kv_heads) for i, a in attn.items()}

    kept = build("dapq", budget=budget).prefill(sdpa_model, ids).report.kept_indices
    _compare(kept, sdpa_model, ref, budget)


def test_reference_comparison_is_exact_on_a_clear_case():
    """Guard against a vacuous comparison: on a peaked model the kept sets equal the reference exactly."""
    sdpa_model, eager_model = _models("llama", 4, 2, 0.3)
    length, budget = 64, 12
    ids = random_ids(length, seed=5)
    attn = reference_attention(eager_model, ids, torch.cat([ids[:, :4], ids[:, -28:]], dim=1))
    ref = {i: window_scores(a, slice(length, length + 32), length, 2) for i, a in attn.items()}
    kept = build("dapq", budget=budget).prefill(sdpa_model, ids).report.kept_indices
    assert _compare(kept, sdpa_model, ref, budget) == len(kept)
    # and a different rule (SnapKV's window inside the prompt) selects differently
    suffix = build("dapq", budget=budget, window="suffix").prefill(sdpa_model, ids).report.kept_indices
    assert any(not torch.equal(suffix[i], kept[i]) for i in kept)


@pytest.mark.parametrize("arch", sorted(REFERENCE_ARCHS))
@SETTINGS
@given(size=st.integers(1, 40), **common)
def test_suffix_window_matches_naive_reference(arch, size, gqa, init, length, batch, data):
    """SnapKV-style window: the last ``size`` prompt rows of a plain prompt forward, no pooling."""
    sdpa_model, eager_model = _models(arch, *gqa, init)
    budget = data.draw(st.integers(1, length - 1), label="budget")
    ids = random_ids(length, batch=batch, seed=2 * length + batch)
    attn = reference_attention(eager_model, ids)
    kv_heads = eager_model.config.num_key_value_heads
    rows = slice(max(0, length - size), length)
    ref = {i: window_scores(a, rows, length, kv_heads) for i, a in attn.items()}

    pipeline = build("dapq", budget=budget, window={"name": "suffix", "size": size}, scorer={"pooling": "none"})
    _compare(pipeline.prefill(sdpa_model, ids).report.kept_indices, sdpa_model, ref, budget)


@pytest.mark.parametrize("window", ["pseudo", "suffix"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@SETTINGS
@given(**common)
def test_avg_pooling_kernel_7_matches_naive_reference(window, arch, gqa, init, length, batch, data):
    """Zero-padded (count_include_pad) moving average, kernel 7, over the GQA-reduced scores."""
    sdpa_model, eager_model = _models(arch, *gqa, init)
    budget = data.draw(st.integers(1, length - 1), label="budget")
    ids = random_ids(length, batch=batch, seed=3 * length + batch)
    kv_heads = eager_model.config.num_key_value_heads
    if window == "pseudo":  # the window follows the prompt: every prompt key is pooled
        attn = reference_attention(eager_model, ids, torch.cat([ids[:, :4], ids[:, -28:]], dim=1))
        rows, start = slice(length, length + 32), length
    else:  # SnapKV pools only the keys before its (force-kept) window; window keys stay unpooled
        attn = reference_attention(eager_model, ids)
        rows, start = slice(length - 32, length), length - 32

    def pooled(scores):
        return torch.cat([avg_pool(scores[..., :start], 7), scores[..., start:]], dim=-1)

    ref = {i: pooled(window_scores(a, rows, length, kv_heads)) for i, a in attn.items()}

    pipeline = build("dapq", budget=budget, window=window, scorer={"pooling": "avg", "kernel": 7})
    _compare(pipeline.prefill(sdpa_model, ids).report.kept_indices, sdpa_model, ref, budget)


@pytest.mark.parametrize(
    "variant",
    ["gqa_max", "softmax_prompt", "mean_aggregation", "max_pool_5", "semantic", "offset", "split_2_30", "question"],
)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(sorted(REFERENCE_ARCHS)), **common)
def test_scorer_and_window_options_match_naive_reference(arch, variant, gqa, init, length, batch, data):
    """The documented options of §6 of the paper notes, each against its naive counterpart.

    ``max_pool_5`` follows the library's documented order (GQA reduction, then pooling).
    """
    sdpa_model, eager_model = _models(arch, *gqa, init)
    budget = data.draw(st.integers(1, length - 1), label="budget")
    ids = random_ids(length, batch=batch, seed=5 * length + batch)
    kv_heads = eager_model.config.num_key_value_heads
    pseudo = torch.cat([ids[:, :4], ids[:, -28:]], dim=1)
    rows = slice(length, length + 32)
    overrides, span, gqa_how, domain = {}, None, "mean", "visible"
    positions = None
    post = lambda s: s  # noqa: E731
    if variant == "gqa_max":
        overrides, gqa_how = {"scorer": {"gqa": "max"}}, "max"
    elif variant == "softmax_prompt":
        overrides, domain = {"scorer": {"softmax_domain": "prompt"}}, "prompt"
    elif variant == "mean_aggregation":  # same ranking as the sum
        overrides = {"scorer": {"aggregation": "mean"}}
    elif variant == "max_pool_5":
        overrides = {"scorer": {"pooling": "max", "kernel": 5}}
        post = lambda s: max_pool(s, 5)  # noqa: E731
    elif variant == "semantic":  # same content at positions 0 … 31
        overrides = {"window": "semantic"}
        positions = torch.arange(32)
    elif variant == "offset":  # the §6.3 ablation: L+3 … L+34
        overrides = {"window": {"position_offset": 3}}
        positions = torch.arange(length + 3, length + 35)
    elif variant == "split_2_30":  # the Qwen split of the paper
        overrides = {"window": {"prefix": 2}}
        pseudo = torch.cat([ids[:, :2], ids[:, -30:]], dim=1)
    elif variant == "question":
        start = data.draw(st.integers(0, length - 1), label="start")
        end = data.draw(st.integers(start + 1, length), label="end")
        overrides, span, pseudo, rows = {"window": "question"}, (start, end), None, slice(start, end)
    attn = reference_attention(eager_model, ids, pseudo, positions)
    ref = {i: post(window_scores(a, rows, length, kv_heads, gqa=gqa_how, domain=domain)) for i, a in attn.items()}

    pipeline = build("dapq", budget=budget, **overrides)
    kept = pipeline.prefill(sdpa_model, ids, question_span=span).report.kept_indices
    _compare(kept, sdpa_model, ref, budget)
