"""Head-adaptive (Ada-KV) caches: real per-head lengths, exact decoding, honest bytes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from kvpress_like import UnsupportedModelError, build
from kvpress_like.attention import COMPRESSED_ATTENTION, compressed_attention, restore_attention
from kvpress_like.compat import model_inputs
from kvpress_like.prefill import feed, shallow_copy
from kvpress_like.ragged import RaggedLayer


def masked_reference_logits(model, ids, extra, kept_masks):
    """Logits of ``extra`` after ``ids`` from the uncompressed model, each head masked to its kept tokens.

    One eager forward over prompt + extra with a per-head 4D mask: prompt rows are causal (the prefill is
    never compressed); extra rows see the kept prompt tokens of their KV head and the extra rows up to
    themselves. ``kept_masks[layer]`` is ``[1, kv_heads, L]``; all layers must share one mask here, so the
    test compresses a one-layer model.
    """
    (mask,) = kept_masks.values()
    length, n_extra = ids.shape[1], extra.shape[1]
    total = length + n_extra
    q_heads = model.config.num_attention_heads
    group = q_heads // mask.shape[1]
    allowed = torch.ones(total, total).tril().bool().expand(1, q_heads, total, total).clone()
    allowed[:, :, length:, :length] = mask.repeat_interleave(group, dim=1)[:, :, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = model(torch.cat([ids, extra], 1), attention_mask=additive)
    return out.logits[:, length:]


@pytest.mark.parametrize("method", ["ada_snapkv", "ada_dapq"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_ragged_decoding_equals_per_head_masked_reference(method, arch):
    model = make_model(arch, attn_implementation="eager", num_hidden_layers=1, num_key_value_heads=4)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 90))
    extra = torch.randint(0, 256, (1, 6))
    pipeline = build(method, budget=40)
    result = pipeline.prefill(model, ids)
    counts = result.report.layers[0].kept_counts
    assert int(counts.sum()) == 4 * 40 and len(set(counts.flatten().tolist())) > 1, "the heads should differ here"
    assert isinstance(result.cache.layers[0], RaggedLayer)
    logits = torch.stack([feed(model, result.cache, extra[:, i : i + 1])[0] for i in range(6)])
    masks = {i: r.kept_mask(90) for i, r in result.report.layers.items()}
    reference = masked_reference_logits(model, ids, extra, masks)[0]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_ragged_cache_bytes_are_the_kept_entries():
    model = make_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 80))
    report = build("ada_snapkv", budget=40).prefill(model, ids).report
    entry_bytes = 2 * model.config.head_dim * 4  # key + value, fp32
    kept = sum(int(layer.kept_counts.sum()) for layer in report.layers.values())
    assert report.cache_bytes_after == kept * entry_bytes


def test_multi_token_continuation_matches_token_by_token():
    model = make_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 70))
    extra = torch.randint(0, 256, (1, 5))
    at_once = build("ada_dapq", budget=30).prefill(model, ids)
    one_by_one = build("ada_dapq", budget=30).prefill(model, ids)
    logits_at_once = feed(model, at_once.cache, extra)
    for i in range(5):
        logits_single = feed(model, one_by_one.cache, extra[:, i : i + 1])
    torch.testing.assert_close(logits_at_once, logits_single, atol=1e-4, rtol=1e-4)


def test_prefill_switches_to_the_compressed_attention_and_a_context_restores_what_was_there():
    model = make_model("llama")
    cache = build("ada_snapkv", budget=40).prefill(model, torch.randint(0, 256, (1, 80))).cache
    assert model.config._attn_implementation == COMPRESSED_ATTENTION  # so model.generate can read the cache
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), compressed_attention(model, cache):
        assert model.config._attn_implementation == COMPRESSED_ATTENTION
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_shallow_copy_of_a_ragged_cache_is_independent():
    model = make_model("llama", num_key_value_heads=4)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    cache = build("ada_dapq", budget=40).prefill(model, ids).cache
    before = [[part.clone() for part in row] for row in cache.layers[0].key_parts]
    feed(model, shallow_copy(cache), torch.randint(0, 256, (1, 3)))
    after = [part for row in cache.layers[0].key_parts for part in row]
    assert all(torch.equal(a, b) for a, b in zip([p for row in before for p in row], after, strict=True))


def test_reading_a_compressed_cache_after_switching_the_attention_back_is_refused():
    model = make_model("llama", num_key_value_heads=4)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    cache = build("ada_dapq", budget=40).prefill(model, ids).cache
    assert isinstance(cache.layers[0], RaggedLayer)
    restore_attention(model)
    with pytest.raises(UnsupportedModelError, match="use_compressed_attention"):
        model(**model_inputs(model, cache, input_ids=ids[:, :1], position_ids=torch.tensor([[90]])))


def test_flash_attention_is_refused_rather_than_masked_wrongly():
    model = make_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # set directly: flash-attn is not installed here
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        compressed_attention(model).__enter__()
