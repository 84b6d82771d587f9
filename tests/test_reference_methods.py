"""Every registered method against a naive reference written here in plain torch.

The references share no code with the library's windows, scorers, allocators or selectors. Each one runs
the *uncompressed* model once under eager attention with ``output_attentions=True`` (on the prompt, or
on the prompt followed by DapQ's 32 pseudo tokens — first 4 + last 28 prompt ids, which a plain forward
of the concatenation puts at positions L … L+31 — or by KVzip's reconstruction of the prompt, at explicit
position ids) and computes the scores from the model's own full
attention matrices, its cache's post-RoPE keys and values, and (Expected Attention) the pre-RoPE queries
recomputed from the hidden states. Selections are written as plain set logic over those scores.

Two float32 computations of the same score differ by ~1e-7 relative, so a token whose reference score
lies within ``RTOL`` (relative to the largest score) of a cut-off may go either way; every other token
must be decided exactly as the reference decides it, and the number of such near-ties is bounded so the
comparison cannot become vacuous.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import fitted_on, naive_prediction
from transformers import DynamicCache

from kvpress_like import build
from kvpress_like.compat import cache_kwarg, model_inputs
from kvpress_like.plugins import get_registry
from kvpress_like.surrogate import save_surrogate
from kvpress_like.testing import make_model

ARCHS = ["llama", "qwen3"]
# 4 layers so the pyramid budgets differ between layers; a larger init than the default gives peaked,
# well-separated attention (the default 0.02 leaves Llama's attention almost uniform).
OVERRIDES = dict(num_hidden_layers=4, initializer_range=0.1)
BATCH = 2
WINDOW = 32  # SnapKV's observation window and DapQ's pseudo-token count
PREFIX = 4  # DapQ: first 4 prompt ids open the pseudo content
KERNEL = 7  # SnapKV's pooling kernel
RTOL = 1e-5
MAX_NEAR_TIES = 3  # per (sequence, head): more would make the comparison too loose to mean anything

# Every built-in method has a reference test below (see test_every_registered_method_is_covered).
METHODS = [
    "ada_dapq", "ada_snapkv", "cap", "critical_dapq", "critical_snapkv", "cur", "dapq", "dapq_chunk", "dapq_plus",
    "dapq_distilled", "dapq_reaimed",
    "dapq_pyramid", "expected_attention", "full", "h2o", "keydiff", "knorm", "kvzap", "kvzap_dms", "kvzip",
    "kvzip_dapq", "lagkv", "non_causal_attention", "observed_attention", "pyramidkv", "random", "snapkv",
    "snapkv_chunk", "streaming_llm", "tova",
]
LEARNED = {"dapq_distilled", "kvzap", "kvzap_dms"}  # their shipped surrogates fit the embedded models only


# ---------------------------------------------------------------------------------------------
# Models, prompts and the uncompressed reference forward
# ---------------------------------------------------------------------------------------------


@functools.cache
def model_for(arch: str, attn_implementation: str = "eager"):
    """Tiny model (same weights for both backends: ``make_model`` seeds before building).

    Qwen3's QK-norm weights start at 1, which gives every key the same norm (K-norm would face nothing but
    ties): they get seeded random weights, as a trained model has.
    """
    model = make_model(arch, attn_implementation=attn_implementation, **OVERRIDES)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (getattr(block.self_attn, "q_norm", None), getattr(block.self_attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def prompt_ids(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + 7 * length + seed)
    return torch.randint(0, 256, (BATCH, length), generator=generator)


def pseudo_ids(ids: torch.Tensor) -> torch.Tensor:
    """DapQ's default content: the first 4 and the last 28 ids of each row's own prompt."""
    return torch.cat([ids[:, :PREFIX], ids[:, ids.shape[1] - (WINDOW - PREFIX):]], dim=1)


@dataclass
class Reference:
    ids: torch.Tensor
    length: int
    attentions: list[torch.Tensor]  # [B, H, T, T] float64, T = L (+ 32 pseudo rows)
    keys: list[torch.Tensor]  # post-RoPE prompt keys [B, kv_heads, L, d] float64
    values: list[torch.Tensor]  # prompt values [B, kv_heads, L, d] float64
    hidden: list[torch.Tensor]  # input of each decoder layer [B, T, hidden]


@functools.cache
def reference_forward(arch: str, length: int, pseudo: bool, seed: int = 0) -> Reference:
    model = model_for(arch)
    ids = prompt_ids(length, seed)
    tokens = torch.cat([ids, pseudo_ids(ids)], dim=1) if pseudo else ids
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=tokens, output_attentions=True, output_hidden_states=True, **model_inputs(model, cache))
    layers = cache.layers
    return Reference(
        ids=ids,
        length=length,
        attentions=[a.double() for a in out.attentions],
        keys=[layer.keys[:, :, :length].double() for layer in layers],
        values=[layer.values[:, :, :length].double() for layer in layers],
        hidden=list(out.hidden_states[: len(layers)]),
    )


def n_layers(arch: str) -> int:
    return model_for(arch).config.num_hidden_layers


def kv_heads(arch: str) -> int:
    return model_for(arch).config.num_key_value_heads


# ---------------------------------------------------------------------------------------------
# Naive score references
# ---------------------------------------------------------------------------------------------


def group_mean(per_head: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``[B, H, L]`` → mean over the query heads of each KV group, ``[B, kv_heads, L]``."""
    batch, heads, length = per_head.shape
    return per_head.reshape(batch, n_kv, heads // n_kv, length).mean(dim=2)


def received_attention(ref: Reference, layer: int, rows: range) -> torch.Tensor:
    """Σ over query ``rows`` of the attention each prompt key receives, per query head ``[B, H, L]``."""
    return ref.attentions[layer][:, :, rows.start : rows.stop, : ref.length].sum(dim=2)


def zero_padded_avg_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Moving average with stride 1; the zero padding counts in the denominator (always ``kernel``)."""
    length = scores.shape[-1]
    out = torch.zeros_like(scores)
    for j in range(length):
        lo, hi = max(0, j - kernel // 2), min(length, j + kernel // 2 + 1)
        out[..., j] = scores[..., lo:hi].sum(-1) / kernel
    return out


def snapkv_scores(arch: str, ref: Reference, layer: int) -> torch.Tensor:
    """SnapKV: the last 32 prompt rows' attention, GQA mean, pooled over the keys before the window only."""
    length = ref.length
    raw = group_mean(received_attention(ref, layer, range(length - WINDOW, length)), kv_heads(arch))
    start = length - WINDOW
    return torch.cat([zero_padded_avg_pool(raw[..., :start], KERNEL), raw[..., start:]], dim=-1)


def dapq_scores(arch: str, ref: Reference, layer: int) -> torch.Tensor:
    """DapQ Eq. 4: Σ over the 32 pseudo rows (positions L … L+31) of the attention, GQA mean."""
    length = ref.length
    return group_mean(received_attention(ref, layer, range(length, length + WINDOW)), kv_heads(arch))


def scores_for(method: str, arch: str, ref: Reference, layer: int) -> torch.Tensor:
    return dapq_scores(arch, ref, layer) if "dapq" in method else snapkv_scores(arch, ref, layer)


def projected_value_norm(arch: str, ref: Reference, layer: int) -> torch.Tensor:
    """CriticalKV: ‖W_o^h v_j‖₁ for each query head h, averaged over each KV group, ``[B, kv_heads, L]``."""
    model = model_for(arch)
    weight = model.model.layers[layer].self_attn.o_proj.weight.detach().double()  # [hidden, H * d]
    values = ref.values[layer]
    batch, n_kv, length, dim = values.shape
    heads = model.config.num_attention_heads
    per_head = torch.zeros(batch, heads, length, dtype=torch.float64)
    for h in range(heads):
        w_h = weight[:, h * dim : (h + 1) * dim]  # the head's slice of the output projection
        v = values[:, h // (heads // n_kv)]  # the KV head this query head reads
        per_head[:, h] = (v @ w_h.T).abs().sum(-1)
    return group_mean(per_head, n_kv)


def rotation_matrix(position: int, inv_freq: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``[d, d]`` RoPE rotation (rotate-half pairing: channel i with channel i + d/2)."""
    half = dim // 2
    matrix = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(half):
        angle = position * float(inv_freq[i])
        c, s = math.cos(angle), math.sin(angle)
        matrix[i, i], matrix[i, i + half] = c, -s
        matrix[i + half, i], matrix[i + half, i + half] = s, c
    return matrix


@functools.cache
def averaged_rotation(theta: float, dim: int, start: int, count: int) -> torch.Tensor:
    """R̄: the mean of the RoPE rotations at positions start … start+count−1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return sum(rotation_matrix(t, inv_freq, dim) for t in range(start, start + count)) / count


def pre_rope_queries(arch: str, ref: Reference, layer: int) -> torch.Tensor:
    """The prompt's pre-RoPE queries ``[B, H, L, d]``: q_proj of the normed layer input (Qwen3: then q_norm)."""
    model = model_for(arch)
    config, block = model.config, model.model.layers[layer]
    attn = block.self_attn
    heads, dim, length = config.num_attention_heads, config.head_dim, ref.length
    with torch.no_grad():
        hidden = block.input_layernorm(ref.hidden[layer][:, :length])
        queries = attn.q_proj(hidden).view(BATCH, length, heads, dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3's per-head RMSNorm on the queries
            queries = attn.q_norm(queries)
    return queries.transpose(1, 2).double()


def expected_attention_scores(arch: str, ref: Reference, layer: int, n_sink: int = 4, n_future: int = 512):
    """Closed form of scorers/expected_attention.py's docstring, from scratch.

    Pre-RoPE queries of the prompt rows n_sink … L−1 → per head mean μ and covariance Σ (1/n); R̄ = mean of
    the RoPE rotations at positions L … L+511; μ' = R̄μ, Σ' = R̄ΣR̄ᵀ; softmax over the prompt keys of
    μ'·k/√d + kᵀΣ'k/(2d); mean over each KV group; × ‖v‖.
    """
    config = model_for(arch).config
    heads, n_kv, dim, length = config.num_attention_heads, config.num_key_value_heads, config.head_dim, ref.length
    queries = pre_rope_queries(arch, ref, layer)[:, :, n_sink:length]  # [B, H, n, d]
    mean = queries.mean(dim=2)
    centred = queries - mean[:, :, None]
    cov = torch.einsum("bhni,bhnj->bhij", centred, centred) / queries.shape[2]

    rotation = averaged_rotation(config.rope_parameters["rope_theta"], dim, length, n_future)
    mean = torch.einsum("ij,bhj->bhi", rotation, mean)
    cov = rotation @ cov @ rotation.T

    scores = torch.zeros(BATCH, heads, length, dtype=torch.float64)
    for h in range(heads):
        keys = ref.keys[layer][:, h // (heads // n_kv)]  # [B, L, d]
        logits = torch.einsum("bld,bd->bl", keys, mean[:, h]) / math.sqrt(dim)
        logits = logits + torch.einsum("bli,bij,blj->bl", keys, cov[:, h], keys) / (2 * dim)
        scores[:, h] = logits.softmax(dim=-1)
    return group_mean(scores, n_kv) * ref.values[layer].norm(dim=-1)


# ---------------------------------------------------------------------------------------------
# Naive selection references and the tolerant comparison
# ---------------------------------------------------------------------------------------------


def tol_of(scores: torch.Tensor) -> float:
    finite = scores[torch.isfinite(scores)]
    return RTOL * max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-3)


def topk_reference(scores: torch.Tensor, budget: int, protected: set[int] = frozenset()):
    """Per (b, h): kept = protected ∪ the best (budget − |protected|) other tokens.

    Returns ``(kept_mask [B, h, L], near_tie_mask [B, h, L])``: near ties lie within the tolerance of the
    cut-off score and may legitimately go either way.
    """
    batch, heads, length = scores.shape
    kept = torch.zeros(batch, heads, length, dtype=torch.bool)
    near = torch.zeros_like(kept)
    for b in range(batch):
        for h in range(heads):
            s = scores[b, h].tolist()
            free = [j for j in range(length) if j not in protected]
            order = sorted(free, key=lambda j: -s[j])
            chosen = set(protected) | set(order[: budget - len(protected)])
            kept[b, h, sorted(chosen)] = True
            if budget - len(protected) < len(order) and budget > len(protected):
                cut = s[order[budget - len(protected) - 1]]
                tol = tol_of(scores[b, h])
                for j in free:
                    near[b, h, j] = abs(s[j] - cut) <= tol
    return kept, near


def assert_masks_match(kept_mask: torch.Tensor, ref_mask: torch.Tensor, near: torch.Tensor | None = None, what=""):
    """Equal kept sets, except for tokens that are near ties of the reference (bounded in number)."""
    assert kept_mask.shape == ref_mask.shape, what
    near = torch.zeros_like(ref_mask) if near is None else near
    assert torch.equal(kept_mask.sum(-1), ref_mask.sum(-1)), f"{what}: kept counts differ"
    assert int(near.sum(-1).max()) <= MAX_NEAR_TIES, f"{what}: too many near ties for a meaningful comparison"
    wrong = (kept_mask != ref_mask) & ~near
    if wrong.any():
        b, h = (int(i) for i in torch.nonzero(wrong)[0][:2])
        missed = torch.nonzero(ref_mask[b, h] & ~kept_mask[b, h]).flatten().tolist()
        extra = torch.nonzero(kept_mask[b, h] & ~ref_mask[b, h]).flatten().tolist()
        raise AssertionError(f"{what} batch {b} head {h}: missed {missed}, wrongly kept {extra}")


def dense_mask(report, layer: int, length: int, budget: int) -> torch.Tensor:
    """The report's kept set as a mask, after checking the dense layout ([B, h, k], sorted, unique)."""
    kept = report.layers[layer].kept_indices
    assert isinstance(kept, torch.Tensor) and kept.shape[-1] == budget
    assert torch.equal(kept, kept.sort(dim=-1).values), "kept indices are not sorted"
    assert bool((kept[..., 1:] != kept[..., :-1]).all()), "duplicate kept indices"
    return report.layers[layer].kept_mask(length)


def check_topk_method(report, ref_scores: dict[int, torch.Tensor], budgets: dict[int, int], length: int,
                      protected_for=lambda budget: set()):
    assert sorted(report.layers) == sorted(ref_scores)
    for layer, scores in ref_scores.items():
        budget = budgets[layer]
        if budget >= length:
            ref, near = torch.ones(*scores.shape, dtype=torch.bool), None
            budget = length
        else:
            ref, near = topk_reference(scores, budget, protected_for(budget))
        assert_masks_match(dense_mask(report, layer, length, budget), ref, near, what=f"layer {layer}")


def run(method: str, arch: str, length: int, budget, backend: str = "eager", seed: int = 0, **overrides):
    pipeline = build(method, budget=budget, **overrides) if budget is not None else build(method, **overrides)
    return pipeline.prefill(model_for(arch, backend), prompt_ids(length, seed))


# ---------------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------------


def test_every_registered_method_is_covered():
    registry = get_registry()
    builtin = {name for name in registry.methods if registry.owners[("method", name)].startswith("kvpress_like.")}
    assert builtin == set(METHODS), "a built-in method was added or removed: give it a reference test here"


# ---------------------------------------------------------------------------------------------
# full, streaming_llm, knorm, random
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_full_keeps_everything(arch):
    length = 96
    ref = reference_forward(arch, length, pseudo=False)
    result = run("full", arch, length, None)
    for layer in range(n_layers(arch)):
        kept = result.report.layers[layer].kept_indices
        assert torch.equal(kept, torch.arange(length).expand(BATCH, kv_heads(arch), length))
        torch.testing.assert_close(result.cache.layers[layer].keys.double(), ref.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.cache.layers[layer].values.double(), ref.values[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(96, 38), (130, 5)])
def test_streaming_llm_keeps_sinks_and_most_recent(arch, length, budget):
    report = run("streaming_llm", arch, length, budget).report
    expected = list(range(4)) + list(range(length - (budget - 4), length))
    for layer in range(n_layers(arch)):
        kept = report.layers[layer].kept_indices
        assert kept.shape == (BATCH, kv_heads(arch), budget)
        assert all(row == expected for row in kept.reshape(-1, budget).tolist())


@pytest.mark.parametrize("arch", ARCHS)
def test_knorm_keeps_lowest_key_norms(arch):
    length, budget = 128, 51
    ref = reference_forward(arch, length, pseudo=False)
    report = run("knorm", arch, length, budget).report
    scores = {layer: -ref.keys[layer].norm(dim=-1) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_is_seeded(arch):
    length, budget = 100, 40
    first = run("random", arch, length, budget).report
    again = run("random", arch, length, budget).report
    other = run("random", arch, length, budget, scorer={"seed": 1}).report
    differs = False
    for layer in range(n_layers(arch)):
        mask = dense_mask(first, layer, length, budget)
        assert mask.sum(-1).eq(budget).all()
        assert torch.equal(first.layers[layer].kept_indices, again.layers[layer].kept_indices)
        differs |= not torch.equal(first.layers[layer].kept_indices, other.layers[layer].kept_indices)
        # not a recency or position rule in disguise: evictions are spread over the prompt
        assert mask[..., : length // 2].any() and (~mask[..., length // 2 :]).any()
    assert differs, "two seeds gave the same kept sets"


# ---------------------------------------------------------------------------------------------
# snapkv, pyramidkv, h2o, tova, dapq, dapq_pyramid
# ---------------------------------------------------------------------------------------------


def window_protected(length: int):
    return lambda budget: set(range(length - WINDOW, length))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 52), (70, 40)])
def test_snapkv_matches_reference(arch, length, budget):
    ref = reference_forward(arch, length, pseudo=False)
    report = run("snapkv", arch, length, budget).report
    scores = {layer: snapkv_scores(arch, ref, layer) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length, window_protected(length))


def pyramid_budgets(layers: int, length: int, budget: int, beta: float, reserved: int) -> list[int]:
    """PyramidKV budgets from the allocator's docstring: free shares linear from 2(B−r) − (B−r)/β down to
    (B−r)/β, plus r each; largest-remainder rounding to a total of layers × B; capped at L, the excess
    going to the largest uncapped layers."""
    free = budget - reserved
    top, bottom = 2 * free - free / beta, free / beta
    step = (top - bottom) / (layers - 1)
    exact = [reserved + top - step * i for i in range(layers)]
    shares = [math.floor(x) for x in exact]
    missing = layers * budget - sum(shares)
    by_remainder = sorted(range(layers), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[:missing]:
        shares[i] += 1
    assert sum(shares) == layers * budget
    excess = sum(max(0, s - length) for s in shares)
    shares = [min(s, length) for s in shares]
    while excess:
        room = [i for i in range(layers) if shares[i] < length]
        largest = max(room, key=lambda i: (shares[i], -i))
        shares[largest] += 1
        excess -= 1
    return shares


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 52), (64, 56)])  # the second one caps a layer at L
def test_pyramidkv_matches_reference(arch, length, budget):
    ref = reference_forward(arch, length, pseudo=False)
    # per-layer budgets need a backend that masks layers of different lengths: the sdpa twin (same weights)
    report = run("pyramidkv", arch, length, budget, backend="sdpa").report
    layers = n_layers(arch)
    budgets = dict(enumerate(pyramid_budgets(layers, length, budget, beta=20.0, reserved=WINDOW)))
    assert {i: r.budget for i, r in report.layers.items()} == budgets
    assert len(set(budgets.values())) >= layers - 1, "the pyramid should give the layers different budgets"
    scores = {layer: snapkv_scores(arch, ref, layer) for layer in range(layers)}
    check_topk_method(report, scores, budgets, length, window_protected(length))


def test_pyramid_budgets_reference_on_known_values():
    """The reference formula itself, on hand-computed cases (β = 20, r = 32, 4 layers)."""
    # B = 52: free 20, shares 71, 58.33, 45.67, 33 → 71, 58, 46, 33
    assert pyramid_budgets(4, 128, 52, 20.0, 32) == [71, 58, 46, 33]
    # B = 56, L = 64: 78.8, 63.6, 48.4, 33.2 → 79, 64, 48, 33 → cap: 64, 64, 63, 33
    assert pyramid_budgets(4, 64, 56, 20.0, 32) == [64, 64, 63, 33]


@pytest.mark.parametrize("arch", ARCHS)
def test_dapq_pyramid_matches_reference(arch):
    length, budget = 128, 52
    ref = reference_forward(arch, length, pseudo=True)
    report = run("dapq_pyramid", arch, length, budget, backend="sdpa").report
    layers = n_layers(arch)
    budgets = dict(enumerate(pyramid_budgets(layers, length, budget, beta=20.0, reserved=0)))
    assert {i: r.budget for i, r in report.layers.items()} == budgets
    assert sum(budgets.values()) == layers * budget
    scores = {layer: dapq_scores(arch, ref, layer) for layer in range(layers)}
    check_topk_method(report, scores, budgets, length)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget", "chunk"), [(128, 52, None), (75, 31, None), (128, 40, 37)])
def test_h2o_matches_reference(arch, length, budget, chunk):
    """``chunk`` (the scorer's query chunk, 256 by default) below L exercises the chunked accumulation."""
    ref = reference_forward(arch, length, pseudo=False)
    overrides = {} if chunk is None else {"scorer": {"chunk": chunk}}
    report = run("h2o", arch, length, budget, **overrides).report
    scores = {
        layer: group_mean(received_attention(ref, layer, range(length)), kv_heads(arch))
        for layer in range(n_layers(arch))
    }
    recent = round(0.5 * budget)
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length,
                      lambda _: set(range(length - recent, length)))


@pytest.mark.parametrize("arch", ARCHS)
def test_tova_matches_reference(arch):
    length, budget = 128, 51
    ref = reference_forward(arch, length, pseudo=False)
    report = run("tova", arch, length, budget).report
    scores = {}
    for layer in range(n_layers(arch)):
        last_row = ref.attentions[layer][:, :, length - 1, :length].mean(dim=1)  # mean over ALL query heads
        scores[layer] = last_row[:, None].expand(-1, kv_heads(arch), -1)
        kept = report.layers[layer].kept_indices
        assert all(torch.equal(kept[:, 0], kept[:, h]) for h in range(kept.shape[1])), "one set for all heads"
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 51), (66, 20)])
def test_dapq_matches_reference(arch, length, budget):
    ref = reference_forward(arch, length, pseudo=True)
    report = run("dapq", arch, length, budget).report
    scores = {layer: dapq_scores(arch, ref, layer) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


def test_dapq_reference_is_not_snapkv():
    """Guard against a vacuous comparison: the two windows pick visibly different sets on these models."""
    length, budget = 128, 51
    ref_pseudo = reference_forward("llama", length, pseudo=True)
    ref_prompt = reference_forward("llama", length, pseudo=False)
    differ = 0
    for layer in range(n_layers("llama")):
        a, _ = topk_reference(dapq_scores("llama", ref_pseudo, layer), budget)
        b, _ = topk_reference(snapkv_scores("llama", ref_prompt, layer), budget)
        differ += int((a != b).sum())
    assert differ > 20


# ---------------------------------------------------------------------------------------------
# expected_attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 51), (80, 24)])
def test_expected_attention_matches_closed_form(arch, length, budget):
    ref = reference_forward(arch, length, pseudo=False)
    report = run("expected_attention", arch, length, budget).report
    scores = {layer: expected_attention_scores(arch, ref, layer) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length, lambda _: set(range(4)))


# ---------------------------------------------------------------------------------------------
# critical_snapkv, critical_dapq
# ---------------------------------------------------------------------------------------------


def critical_reference(attention: torch.Tensor, weighted: torch.Tensor, budget: int, protected: set[int]):
    """CriticalKV two-stage selection, per (b, h): the top ⌊0.5·B⌉ prompt tokens by attention alone, the
    protected tokens, then the best re-weighted scores (attention × ‖W_o v‖₁) up to the budget."""
    batch, heads, length = attention.shape
    kept = torch.zeros(batch, heads, length, dtype=torch.bool)
    near = torch.zeros_like(kept)
    first = round(0.5 * budget)
    for b in range(batch):
        for h in range(heads):
            a, w = attention[b, h], weighted[b, h]
            a_list, w_list = a.tolist(), w.tolist()
            by_attention = sorted(range(length), key=lambda j: -a_list[j])
            chosen = set(by_attention[:first]) | protected
            assert len(chosen) <= budget
            rest = sorted((j for j in range(length) if j not in chosen), key=lambda j: -w_list[j])
            second = rest[: budget - len(chosen)]
            chosen |= set(second)
            kept[b, h, sorted(chosen)] = True
            cut_a, tol_a = a_list[by_attention[first - 1]], tol_of(a)
            near[b, h] |= (a - cut_a).abs() <= tol_a
            if second:
                cut_w, tol_w = w_list[second[-1]], tol_of(w)
                near[b, h] |= (w - cut_w).abs() <= tol_w
            near[b, h, sorted(protected)] = False
    return kept, near


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "length", "budget"), [("critical_snapkv", 160, 80), ("critical_dapq", 128, 51)])
def test_critical_matches_reference(method, arch, length, budget):
    ref = reference_forward(arch, length, pseudo="dapq" in method)
    report = run(method, arch, length, budget).report
    protected = set(range(length - WINDOW, length)) if "snapkv" in method else set()
    for layer in range(n_layers(arch)):
        attention = scores_for(method, arch, ref, layer)
        weighted = attention * projected_value_norm(arch, ref, layer)
        expected, near = critical_reference(attention, weighted, budget, protected)
        assert_masks_match(dense_mask(report, layer, length, budget), expected, near, what=f"layer {layer}")
        # the re-weighting matters: plain attention top-k would keep a different set
        plain, _ = topk_reference(attention, budget, protected)
        assert not torch.equal(plain, expected)


# ---------------------------------------------------------------------------------------------
# ada_snapkv, ada_dapq (head-adaptive budgets)
# ---------------------------------------------------------------------------------------------


def ada_reference(scores: torch.Tensor, budget: int, protected: set[int], alpha: float = 0.2):
    """Ada-KV: each head keeps its protected tokens and its top ⌊α·(B − protected)⌋ others, then the
    layer's remaining heads × (B − guaranteed) slots go to the best remaining (head, token) scores."""
    batch, heads, length = scores.shape
    kept = torch.zeros(batch, heads, length, dtype=torch.bool)
    near = torch.zeros_like(kept)
    safeguard = len(protected) + math.floor(alpha * (budget - len(protected)))
    for b in range(batch):
        values = scores[b].tolist()
        ranked = {(h, j): (math.inf if j in protected else values[h][j]) for h in range(heads) for j in range(length)}
        guaranteed = set()
        for h in range(heads):
            order = sorted(range(length), key=lambda j, h=h: -ranked[(h, j)])
            guaranteed |= {(h, j) for j in order[:safeguard]}
            cut = ranked[(h, order[safeguard - 1])] if safeguard else math.inf
            if math.isfinite(cut):
                tol = tol_of(scores[b, h])
                near[b, h] |= (scores[b, h] - cut).abs() <= tol
        pool = sorted((key for key in ranked if key not in guaranteed), key=lambda key: -ranked[key])
        winners = pool[: heads * (budget - safeguard)]
        cut = ranked[winners[-1]]
        tol = tol_of(scores[b])
        near[b] |= (scores[b] - cut).abs() <= tol
        for h, j in guaranteed | set(winners):
            kept[b, h, j] = True
    for j in protected:
        near[:, :, j] = False
    return kept, near


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "length", "budget", "alpha"), [
    ("ada_snapkv", 128, 52, None), ("ada_dapq", 128, 40, None),
    ("ada_snapkv", 128, 52, 0.9), ("ada_dapq", 128, 40, 0.9),
])
def test_head_adaptive_matches_reference(method, arch, length, budget, alpha):
    """The method's α = 0.2, and α = 0.9 where the safeguard binds (the heads are nearly balanced on these
    models, so 0.2 never binds: α = 0.9 checks that the safeguard itself is right)."""
    ref = reference_forward(arch, length, pseudo="dapq" in method)
    overrides = {} if alpha is None else {"allocator": {"alpha": alpha}}
    report = run(method, arch, length, budget, **overrides).report
    protected = set(range(length - WINDOW, length)) if "snapkv" in method else set()
    uneven = safeguard_binds = False
    for layer in range(n_layers(arch)):
        layer_report = report.layers[layer]
        scores = scores_for(method, arch, ref, layer)
        expected, near = ada_reference(scores, budget, protected, 0.2 if alpha is None else alpha)
        safeguard_binds |= not torch.equal(expected, ada_reference(scores, budget, protected, 0.0)[0])
        kept = layer_report.kept_indices
        counts = expected.sum(-1)
        if isinstance(kept, torch.Tensor):
            assert counts.eq(budget).all(), "the report is dense but the reference gives heads different counts"
        else:  # list[batch] of list[head] of sorted unique 1-D index tensors
            assert len(kept) == BATCH and all(len(row) == kv_heads(arch) for row in kept)
            for row in kept:
                for index in row:
                    assert torch.equal(index, index.unique(sorted=True))
            uneven |= len(set(counts.flatten().tolist())) > 1
        assert layer_report.kept_counts.sum(-1).eq(budget * kv_heads(arch)).all(), "the layer budget is shared"
        assert_masks_match(layer_report.kept_mask(length).cpu(), expected, near, what=f"layer {layer}")
    assert uneven, "the heads should get different budgets somewhere on these models"
    assert safeguard_binds or alpha is None, "α = 0.9 should change the kept sets somewhere"


# ---------------------------------------------------------------------------------------------
# snapkv_chunk, dapq_chunk
# ---------------------------------------------------------------------------------------------


def chunk_reference(scores: torch.Tensor, budget: int, protected: set[int], chunk: int = 16) -> torch.Tensor:
    """ChunkKV: protected tokens first; chunks [0,16), [16,32), … ranked by the mean score of their
    unprotected tokens; whole chunks in that order, the chunk where the budget ends filled by its best tokens."""
    batch, heads, length = scores.shape
    kept = torch.zeros(batch, heads, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            s = scores[b, h].tolist()
            chosen = set(protected)
            chunks = []
            for start in range(0, length, chunk):
                free = [j for j in range(start, min(start + chunk, length)) if j not in protected]
                if free:
                    chunks.append((sum(s[j] for j in free) / len(free), start, free))
            for _, _, free in sorted(chunks, key=lambda c: (-c[0], c[1])):
                room = budget - len(chosen)
                if room <= 0:
                    break
                chosen |= set(sorted(free, key=lambda j: -s[j])[:room])
            kept[b, h, sorted(chosen)] = True
    return kept


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "length", "budget"), [
    ("snapkv_chunk", 128, 70), ("snapkv_chunk", 120, 60), ("dapq_chunk", 128, 51), ("dapq_chunk", 100, 40),
])
def test_chunk_matches_reference(method, arch, length, budget):
    ref = reference_forward(arch, length, pseudo="dapq" in method)
    report = run(method, arch, length, budget).report
    protected = set(range(length - WINDOW, length)) if "snapkv" in method else set()
    for layer in range(n_layers(arch)):
        expected = chunk_reference(scores_for(method, arch, ref, layer), budget, protected)
        assert_masks_match(dense_mask(report, layer, length, budget), expected, what=f"layer {layer}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 60), (100, 45)])
def test_dapq_plus_matches_reference(arch, length, budget):
    """dapq_plus: the last 32 prompt rows and the 32 pseudo rows score together, GQA mean, avg-pooled (kernel 7)
    over the keys before the window, chunks of 16, 4 sinks + last 32 kept."""
    ref = reference_forward(arch, length, pseudo=True)
    report = run("dapq_plus", arch, length, budget).report
    protected = set(range(4)) | set(range(length - WINDOW, length))
    start = length - WINDOW
    for layer in range(n_layers(arch)):
        raw = group_mean(received_attention(ref, layer, range(start, length + WINDOW)), kv_heads(arch))
        scores = torch.cat([zero_padded_avg_pool(raw[..., :start], KERNEL), raw[..., start:]], dim=-1)
        expected = chunk_reference(scores, budget, protected)
        assert_masks_match(dense_mask(report, layer, length, budget), expected, what=f"layer {layer}")


# ---------------------------------------------------------------------------------------------
# kvpress parity: keydiff, cur, lagkv, observed_attention, non_causal_attention
# ---------------------------------------------------------------------------------------------


def assert_best_kept(kept_mask: torch.Tensor, scores: torch.Tensor, budget: int, protected: set[int] = frozenset(),
                     what: str = ""):
    """Top-k up to ties: per (b, h) exactly ``budget`` tokens, every protected one, and no evicted token scoring
    above a kept unprotected one (equal scores may go either way; used where scores tie exactly, e.g. ranks)."""
    batch, heads, length = scores.shape
    for b in range(batch):
        for h in range(heads):
            kept = set(torch.nonzero(kept_mask[b, h]).flatten().tolist())
            assert len(kept) == budget, f"{what} batch {b} head {h}: kept {len(kept)} tokens, not {budget}"
            assert set(protected) <= kept, f"{what} batch {b} head {h}: protected {sorted(set(protected) - kept)} lost"
            s = scores[b, h].tolist()
            chosen = [s[j] for j in kept - set(protected)]
            evicted = [s[j] for j in range(length) if j not in kept]
            if chosen and evicted:
                tol = tol_of(scores[b, h])
                assert min(chosen) >= max(evicted) - tol, f"{what} batch {b} head {h}: a better token was evicted"


def keydiff_scores(ref: Reference, layer: int) -> torch.Tensor:
    """−cos(k_j, a) with a = the mean over j of k_j / ‖k_j‖, per KV head."""
    keys = ref.keys[layer]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    anchor = unit.mean(dim=2, keepdim=True)
    return -(keys * anchor).sum(-1) / (keys.norm(dim=-1) * anchor.norm(dim=-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_keydiff_matches_reference(arch):
    length, budget = 128, 45
    ref = reference_forward(arch, length, pseudo=False)
    report = run("keydiff", arch, length, budget).report
    scores = {layer: keydiff_scores(ref, layer) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


def cur_scores(ref: Reference, layer: int, window: int = 16) -> torch.Tensor:
    """‖k_j‖² / Σ_{window of j} ‖k‖², the same for values, multiplied, then divided by the sum over the prompt."""
    energies = []
    for states in (ref.keys[layer], ref.values[layer]):
        energy = (states**2).sum(-1)
        local = torch.zeros_like(energy)
        for start in range(0, ref.length, window):
            block = energy[..., start : start + window]
            local[..., start : start + window] = block / block.sum(-1, keepdim=True)
        energies.append(local)
    product = energies[0] * energies[1]
    return product / product.sum(-1, keepdim=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 40), (100, 37)])  # 100: a last window of 4 tokens
def test_cur_matches_reference(arch, length, budget):
    ref = reference_forward(arch, length, pseudo=False)
    report = run("cur", arch, length, budget).report
    scores = {layer: cur_scores(ref, layer) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length, lambda _: set(range(4)))


def lagkv_scores(ref: Reference, layer: int, n_sink: int, lag: int) -> torch.Tensor:
    """LagKV, token by token: partitions of ``lag`` after the sinks; partition p's tokens are normalised channel
    by channel by partition p+1's min and max; std over channels; softmax over p's tokens; key and value shares
    averaged; score = rank inside p / lag. Sinks and the last full partition + rest score 1. Short prompts:
    sinks 1, then (j − n_sink) / (L − n_sink)."""
    length = ref.length
    batch, heads = ref.keys[layer].shape[:2]
    scores = torch.ones(batch, heads, length, dtype=torch.float64)
    if length < n_sink + 2 * lag:
        for j in range(n_sink, length):
            scores[..., j] = (j - n_sink) / (length - n_sink)
        return scores
    n_parts = (length - n_sink) // lag
    for b in range(batch):
        for h in range(heads):
            for p in range(n_parts - 1):
                start, nxt = n_sink + p * lag, n_sink + (p + 1) * lag
                share = torch.zeros(lag, dtype=torch.float64)
                for states in (ref.keys[layer][b, h], ref.values[layer][b, h]):
                    low, high = states[nxt : nxt + lag].min(0).values, states[nxt : nxt + lag].max(0).values
                    spread = torch.stack([((states[j] - low) / (high - low)).std() for j in range(start, nxt)])
                    share += spread.softmax(0) / 2
                order = sorted(range(lag), key=lambda i: float(share[i]))
                for rank, i in enumerate(order):
                    scores[b, h, start + i] = rank / lag
    return scores


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget", "lag"), [
    (100, 50, 16),  # 5 ranked partitions, 20 tokens scored 1, the cut between two rank levels
    (110, 47, 16),  # a tail of 26 tokens, the cut inside a rank level (equal ranks go either way)
    (130, 40, 128),  # too short for two partitions: sinks + the most recent tokens
])
def test_lagkv_matches_reference(arch, length, budget, lag):
    ref = reference_forward(arch, length, pseudo=False)
    report = run("lagkv", arch, length, budget, scorer={"lag": lag}).report
    for layer in range(n_layers(arch)):
        scores = lagkv_scores(ref, layer, n_sink=4, lag=lag)
        assert_best_kept(dense_mask(report, layer, length, budget), scores, budget, what=f"layer {layer}")
    if lag == 128:
        expected = list(range(4)) + list(range(length - (budget - 4), length))
        assert all(row == expected for row in report.layers[0].kept_indices.reshape(-1, budget).tolist())


@pytest.mark.parametrize("arch", ARCHS)
def test_observed_attention_matches_reference(arch):
    """Σ over every prompt query of the attention key j receives, ÷ (L − j) queries that see it, GQA mean."""
    length, budget = 128, 50
    ref = reference_forward(arch, length, pseudo=False)
    report = run("observed_attention", arch, length, budget).report
    seen_by = torch.arange(length, 0, -1, dtype=torch.float64)
    scores = {
        layer: group_mean(received_attention(ref, layer, range(length)) / seen_by, kv_heads(arch))
        for layer in range(n_layers(arch))
    }
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


def post_rope_queries(arch: str, ref: Reference, layer: int) -> torch.Tensor:
    """The prompt's queries ``[B, H, L, d]``, rotated by RoPE at each row's position."""
    config = model_for(arch).config
    queries, dim = pre_rope_queries(arch, ref, layer), config.head_dim
    inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.stack([queries[:, :, j] @ rotation_matrix(j, inv_freq, dim).T for j in range(ref.length)], dim=2)


def non_causal_scores(arch: str, ref: Reference, layer: int, chunk: int) -> torch.Tensor:
    """Within each chunk of rows, softmax over the chunk's keys of the unscaled q·k (no causal mask), summed over
    the chunk's queries; GQA mean; × ‖v‖; zero-padded average pool of 3; (s − mean) / std over heads and tokens
    of each sequence."""
    queries, keys = post_rope_queries(arch, ref, layer), ref.keys[layer]
    heads, n_kv, length = queries.shape[1], keys.shape[1], ref.length
    received = torch.zeros(BATCH, heads, length, dtype=torch.float64)
    for h in range(heads):
        k = keys[:, h // (heads // n_kv)]
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            logits = queries[:, h, start:stop] @ k[:, start:stop].transpose(-1, -2)
            received[:, h, start:stop] = logits.softmax(-1).sum(1)
    pooled = zero_padded_avg_pool(group_mean(received, n_kv) * ref.values[layer].norm(dim=-1), 3)
    flat = pooled.reshape(BATCH, -1)
    return (pooled - flat.mean(1)[:, None, None]) / flat.std(1)[:, None, None]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget", "chunk"), [(128, 50, None), (130, 41, 48)])
def test_non_causal_attention_matches_reference(arch, length, budget, chunk):
    """``chunk`` 48 cuts a 130-token prompt into 48 + 48 + 34 rows; by default (256) it is one chunk."""
    ref = reference_forward(arch, length, pseudo=False)
    overrides = {} if chunk is None else {"scorer": {"chunk": chunk}}
    report = run("non_causal_attention", arch, length, budget, **overrides).report
    scores = {layer: non_causal_scores(arch, ref, layer, chunk or 256) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


def cap_scores(arch: str, ref: Reference, layer: int, n_sink: int = 4, tau: float = 5.0, n_future: int = 512):
    """CapKV, per query head: μ = mean of the pre-RoPE queries of rows n_sink … L−1, times R̄ (RoPE averaged over
    positions L … L+511); w_j = exp(τ·cos(k_j, R̄μ) − max_j); A = I + Σ_j w_j v_j v_jᵀ (over j ≥ n_sink);
    s_j = w_j · v_jᵀ A⁻¹ v_j; GQA mean; the sinks score max + 1."""
    config = model_for(arch).config
    heads, n_kv, dim, length = config.num_attention_heads, config.num_key_value_heads, config.head_dim, ref.length
    rotation = averaged_rotation(config.rope_parameters["rope_theta"], dim, length, n_future)
    anchor = pre_rope_queries(arch, ref, layer)[:, :, n_sink:].mean(dim=2) @ rotation.T  # [B, H, d]
    per_head = torch.zeros(BATCH, heads, length - n_sink, dtype=torch.float64)
    for b in range(BATCH):
        for h in range(heads):
            keys = ref.keys[layer][b, h // (heads // n_kv), n_sink:]
            values = ref.values[layer][b, h // (heads // n_kv), n_sink:]
            cosine = keys @ anchor[b, h] / (keys.norm(dim=-1) * anchor[b, h].norm())
            weights = torch.exp(tau * cosine - (tau * cosine).max())
            capacity = torch.eye(dim, dtype=torch.float64) + sum(
                (w + 1e-6) * torch.outer(v, v) for w, v in zip(weights, values, strict=True)
            )
            inverse = torch.linalg.inv(capacity)
            per_head[b, h] = torch.stack([w * v @ inverse @ v for w, v in zip(weights, values, strict=True)])
    scores = group_mean(per_head, n_kv)
    top = scores.reshape(BATCH, -1).max(dim=1).values[:, None, None] + 1
    return torch.cat([top.expand(-1, n_kv, n_sink), scores], dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 45), (90, 20)])
def test_cap_matches_reference(arch, length, budget):
    ref = reference_forward(arch, length, pseudo=False)
    report = run("cap", arch, length, budget).report
    scores = {layer: cap_scores(arch, ref, layer) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


# ---------------------------------------------------------------------------------------------
# kvzip (context reconstruction, max attention, one top-k per layer)
# ---------------------------------------------------------------------------------------------

INSTRUCTION_IDS, RESUME_IDS, OPENER_IDS = [11, 12, 13], [21, 22], [31]


def reconstruction_ids(row: list[int], start: int, chunk: int, overlap: int, period: int, keep: int):
    """KVzip's reconstruction input for one prompt, as ``(token, offset in the full reconstruction)`` pairs.

    The prompt from ``start`` on in chunks; the first after the instruction, every later one after the resume
    ids and the previous chunk's last ``overlap`` tokens; the opener right before each chunk's tokens. With
    ``period > 1`` only the prompt tokens j with j mod period < keep are fed (cue tokens always are).
    """
    out, offset = [], 0
    for first in range(start, len(row), chunk):
        cue = INSTRUCTION_IDS if first == start else RESUME_IDS + row[max(start, first - overlap) : first]
        for token in cue + OPENER_IDS:
            out.append((token, offset))
            offset += 1
        for j in range(first, min(first + chunk, len(row))):
            if j % period < keep:
                out.append((row[j], offset))
            offset += 1
    return out


@functools.cache
def reconstruction_attentions(arch: str, length: int, start: int, chunk: int, period: int, keep: int,
                              positions: str) -> list[torch.Tensor]:
    """Eager attention of the uncompressed model over [prompt ; reconstruction], ``[B, H, T, T]`` float64.

    Positions: the prompt at 0 … L−1; a reconstruction row at L + its offset (``after``) or at L + (its
    index mod 32) (``decoding``).
    """
    model = model_for(arch)
    ids = prompt_ids(length)
    rows = [reconstruction_ids(r, start, chunk, 8, period, keep) for r in ids.tolist()]
    tokens = torch.tensor([[token for token, _ in r] for r in rows])
    if positions == "after":
        extra = [length + offset for _, offset in rows[0]]
    else:
        extra = [length + i % 32 for i in range(len(rows[0]))]
    position_ids = torch.tensor(list(range(length)) + extra).expand(BATCH, -1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.cat([ids, tokens], dim=1), position_ids=position_ids, output_attentions=True,
                    **model_inputs(model, cache))
    return [a.double() for a in out.attentions]


def max_received(attentions: torch.Tensor, length: int, n_kv: int) -> torch.Tensor:
    """KVzip's score: the largest attention key j gets from any reconstruction row and any query head of its
    KV group, ``[B, kv_heads, L]``."""
    per_head = attentions[:, :, length:, :length].amax(dim=2)  # over the reconstruction rows
    batch, heads, _ = per_head.shape
    return per_head.reshape(batch, n_kv, heads // n_kv, length).amax(dim=2)


def global_reference(scores: torch.Tensor, budget: int, protected: set[int]):
    """One top-(heads × budget) over every (head, token) of the layer; protected tokens first in every head."""
    batch, heads, length = scores.shape
    kept = torch.zeros(batch, heads, length, dtype=torch.bool)
    near = torch.zeros_like(kept)
    for b in range(batch):
        values = scores[b].tolist()
        ranked = sorted(((math.inf if j in protected else values[h][j], h, j) for h in range(heads)
                         for j in range(length)), reverse=True)
        for _, h, j in ranked[: heads * budget]:
            kept[b, h, j] = True
        cut = ranked[heads * budget - 1][0]
        near[b] = (scores[b] - cut).abs() <= tol_of(scores[b])
    for j in protected:
        near[:, :, j] = False
    return kept, near


def kvzip_options(start: int, chunk: int) -> dict:
    return {"instruction_ids": INSTRUCTION_IDS, "resume_ids": RESUME_IDS, "opener_ids": OPENER_IDS, "start": start,
            "chunk_size": chunk}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "positions"), [("kvzip", "after"), ("kvzip_dapq", "decoding")])
@pytest.mark.parametrize(("length", "budget", "start", "chunk"), [(128, 40, 0, 2048), (100, 30, 5, 40)])
def test_kvzip_matches_reference(arch, method, positions, length, budget, start, chunk):
    """One chunk from the first token, and three chunks after a 5-token head (resume ids + 8-token overlap);
    kvzip_dapq: the same rows at positions L + (row index mod 32)."""
    attentions = reconstruction_attentions(arch, length, start, chunk, 1, 1, positions)
    report = run(method, arch, length, budget, window=kvzip_options(start, chunk)).report
    uneven = False
    for layer in range(n_layers(arch)):
        expected, near = global_reference(max_received(attentions[layer], length, kv_heads(arch)), budget,
                                          set(range(4)))
        layer_report = report.layers[layer]
        assert layer_report.kept_counts.sum(-1).eq(budget * kv_heads(arch)).all(), "the layer budget is shared"
        assert_masks_match(layer_report.kept_mask(length).cpu(), expected, near, what=f"layer {layer}")
        uneven |= len(set(expected.sum(-1).flatten().tolist())) > 1
    assert uneven, "the heads should get different budgets somewhere on these models"


def test_kvzip_references_are_not_dapq_nor_each_other():
    """Guard against vacuous comparisons: max over the reconstruction picks other keys than DapQ's sum, and
    the decoding positions change what the reconstruction picks."""
    length, budget = 128, 40
    ref = reference_forward("llama", length, pseudo=True)
    after = reconstruction_attentions("llama", length, 0, 2048, 1, 1, "after")
    decoding = reconstruction_attentions("llama", length, 0, 2048, 1, 1, "decoding")
    differ = {"dapq": 0, "decoding": 0}
    for layer in range(n_layers("llama")):
        kvzip, _ = global_reference(max_received(after[layer], length, kv_heads("llama")), budget, set(range(4)))
        dapq, _ = global_reference(dapq_scores("llama", ref, layer), budget, set(range(4)))
        moved, _ = global_reference(max_received(decoding[layer], length, kv_heads("llama")), budget, set(range(4)))
        differ["dapq"] += int((kvzip != dapq).sum())
        differ["decoding"] += int((kvzip != moved).sum())
    assert min(differ.values()) > 20, differ


# ---------------------------------------------------------------------------------------------
# small budgets: layers or heads with nothing to keep
# ---------------------------------------------------------------------------------------------


def test_head_adaptive_with_a_head_left_empty():
    """A head may be left with nothing: it is stored empty and decodes from the new tokens alone."""
    length, budget = 100, 2
    ref = reference_forward("llama", length, pseudo=True)
    expected = {layer: ada_reference(dapq_scores("llama", ref, layer), budget, set()) for layer in range(4)}
    assert any(bool(mask.sum(-1).eq(0).any()) for mask, _ in expected.values()), "precondition: an empty head"
    report = run("ada_dapq", "llama", length, budget).report
    for layer, (mask, near) in expected.items():
        assert_masks_match(report.layers[layer].kept_mask(length).cpu(), mask, near, what=f"layer {layer}")


def test_dapq_pyramid_with_a_layer_budget_of_zero():
    """A layer whose pyramid share rounds to 0 keeps nothing from the prompt (and still decodes)."""
    length, budget = 100, 10
    budgets = pyramid_budgets(4, length, budget, beta=20.0, reserved=0)
    assert budgets == [20, 13, 7, 0]
    report = run("dapq_pyramid", "llama", length, budget, backend="sdpa").report
    for layer in report.layers.values():
        assert layer.kept_counts.eq(layer.budget).all()
    assert sum(layer.budget for layer in report.layers.values()) == 4 * budget


# ---------------------------------------------------------------------------------------------
# budget >= L: lossless for every method
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_budget_covering_the_prompt_generates_like_no_compression(method, arch, tmp_path):
    """kvzap_dms takes no budget: a threshold below every score is its way of covering the prompt."""
    length, new_tokens = 72, 6
    model = model_for(arch, "sdpa")
    ids = prompt_ids(length, seed=3)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    overrides = {"scorer": surrogate_artifact(arch, "linear", tmp_path)} if method in LEARNED else {}
    if method in ("full", "kvzap_dms"):
        pipeline = build(method, **overrides, **({"selector": {"threshold": -1e30}} if method == "kvzap_dms" else {}))
    else:
        pipeline = build(method, budget=length + 3, **overrides)
    result = pipeline.prefill(model, ids)
    for layer in result.report.layers.values():
        assert layer.kept_counts.eq(length).all()
    first = result.next_token_logits.argmax(-1, keepdim=True)
    extended = torch.cat([ids, first], dim=1)
    out = model.generate(extended, attention_mask=torch.ones_like(extended), **{cache_kwarg(model): result.cache},
                         max_new_tokens=new_tokens - 1, do_sample=False)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# dapq_reaimed: SnapKV's last 32 queries rotated to DapQ's positions L … L+31
# ---------------------------------------------------------------------------------------------


def reaimed_scores(arch: str, ref: Reference, layer: int) -> torch.Tensor:
    """The last 32 prompt rows' queries recomputed from their hidden states with the model's own projection,
    QK-norm and rotary embedding at positions L … L+31 (not their own), softmax over every prompt key, summed
    over the queries, GQA mean. Nothing pooled, nothing protected (DapQ's scorer)."""
    model = model_for(arch)
    attention = model.model.layers[layer].self_attn
    length, heads, dim = ref.length, model.config.num_attention_heads, attention.head_dim
    hidden = model.model.layers[layer].input_layernorm(ref.hidden[layer][:, length - WINDOW : length])
    with torch.no_grad():
        queries = attention.q_proj(hidden).view(BATCH, WINDOW, heads, dim)
        if hasattr(attention, "q_norm"):
            queries = attention.q_norm(queries)
        positions = torch.arange(length, length + WINDOW)[None]
        cos, sin = model.model.rotary_emb(hidden, positions)
    queries, cos, sin = queries.transpose(1, 2).double(), cos[:, None].double(), sin[:, None].double()
    rotated = torch.cat([-queries[..., dim // 2 :], queries[..., : dim // 2]], dim=-1)
    queries = queries * cos + rotated * sin
    keys = ref.keys[layer].repeat_interleave(heads // kv_heads(arch), dim=1)
    probs = (queries @ keys.transpose(-1, -2) / math.sqrt(dim)).softmax(dim=-1)
    return group_mean(probs.sum(dim=2), kv_heads(arch))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("length", "budget"), [(128, 51), (66, 20)])
def test_dapq_reaimed_matches_reference(arch, length, budget):
    ref = reference_forward(arch, length, pseudo=False)
    report = run("dapq_reaimed", arch, length, budget).report
    scores = {layer: reaimed_scores(arch, ref, layer) for layer in range(n_layers(arch))}
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)


def test_reaimed_window_is_neither_snapkv_nor_dapq():
    """Guard against a vacuous comparison: moving the queries changes what they keep."""
    ref = reference_forward("llama", 128, pseudo=False)
    reaimed = topk_reference(reaimed_scores("llama", ref, 1), 40)[0]
    snap = topk_reference(group_mean(received_attention(ref, 1, range(96, 128)), kv_heads("llama")), 40)[0]
    dapq = topk_reference(dapq_scores("llama", reference_forward("llama", 128, pseudo=True), 1), 40)[0]
    assert not torch.equal(reaimed, snap) and not torch.equal(reaimed, dapq)


# ---------------------------------------------------------------------------------------------
# kvzap, kvzap_dms, dapq_distilled: a surrogate's predictions from each layer's attention input
# ---------------------------------------------------------------------------------------------


def surrogate_artifact(arch: str, kind: str, folder: Path) -> dict:
    """A random surrogate fitted to the tiny model's fingerprints, saved to ``folder``: the scorer override."""
    save_surrogate(fitted_on(model_for(arch), kind, seed=3), folder)
    return {"artifact": str(folder)}


def learned_scores(arch: str, ref: Reference, folder: Path) -> dict[int, torch.Tensor]:
    """The saved surrogate applied token by token to each layer's attention input (its input norm of the
    decoder layer's input), ``[B, kv_heads, L]`` per layer."""
    from kvpress_like.surrogate import load_surrogate

    model, surrogate = model_for(arch), load_surrogate(folder)
    with torch.no_grad():
        inputs = {i: model.model.layers[i].input_layernorm(ref.hidden[i]) for i in range(n_layers(arch))}
    return {i: naive_prediction(surrogate, i, hidden).double() for i, hidden in inputs.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kvzap_matches_reference(arch, kind, tmp_path):
    """One top-(layers × heads × B) over every (layer, head, token) of the predictions, the 4 sinks first."""
    length, budget = 96, 24
    scorer = surrogate_artifact(arch, kind, tmp_path)
    scores = learned_scores(arch, reference_forward(arch, length, pseudo=False), tmp_path)
    layers = sorted(scores)
    stacked = torch.cat([scores[i] for i in layers], dim=1)  # the layers' heads side by side
    expected, near = global_reference(stacked, budget, set(range(4)))
    report = run("kvzap", arch, length, budget, scorer=scorer).report
    kept = torch.cat([report.layers[i].kept_mask(length).cpu() for i in layers], dim=1)
    assert_masks_match(kept, expected, near, what="all layers")
    per_layer = expected.sum(-1).view(BATCH, len(layers), -1).sum(-1)
    assert len(set(per_layer.flatten().tolist())) > 1, "the layers should get different budgets on these models"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("threshold", [-1.0, 0.5])
def test_kvzap_dms_matches_reference(arch, threshold, tmp_path):
    """Kept: the 4 sinks, the last 16 tokens and every token predicted at or above the threshold."""
    length, recent = 96, 16
    scorer = surrogate_artifact(arch, "mlp", tmp_path)
    scores = learned_scores(arch, reference_forward(arch, length, pseudo=False), tmp_path)
    report = run("kvzap_dms", arch, length, None, scorer=scorer,
                 selector={"threshold": threshold, "recent": recent}).report
    positions = torch.arange(length)
    protected = (positions < 4) | (positions >= length - recent)
    for layer, layer_scores in scores.items():
        expected = protected | (layer_scores >= threshold)
        near = ((layer_scores - threshold).abs() <= tol_of(layer_scores)) & ~protected
        assert_masks_match(report.layers[layer].kept_mask(length).cpu(), expected, near, what=f"layer {layer}")
        share = float(expected.float().mean())
        assert float(protected.float().mean()) < share < 1, "the threshold should evict some tokens and keep others"


@pytest.mark.parametrize("arch", ARCHS)
def test_dapq_distilled_matches_reference(arch, tmp_path):
    """DapQ's budgets (uniform, nothing protected) over the predictions."""
    length, budget = 96, 30
    scorer = surrogate_artifact(arch, "linear", tmp_path)
    scores = learned_scores(arch, reference_forward(arch, length, pseudo=False), tmp_path)
    report = run("dapq_distilled", arch, length, budget, scorer=scorer).report
    check_topk_method(report, scores, dict.fromkeys(scores, budget), length)
