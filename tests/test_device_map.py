"""A model dispatched by accelerate (some layers on the CPU, the others offloaded to disk) compresses exactly
as the same model in one piece: same kept indices, same greedy continuation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, tiny_model

from kvpress_like import build
from kvpress_like.decoding import decode_batch, parse_generation_options

accelerate = pytest.importorskip("accelerate")

LAYERS, LENGTH, BUDGET, NEW_TOKENS = 4, 200, 64, 8


@pytest.fixture(scope="module")
def whole():
    return tiny_model("llama", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def dispatched(whole, tmp_path_factory):
    """A copy of ``whole`` whose memory budget holds the embeddings and one layer; the rest goes to disk."""
    from accelerate.utils import compute_module_sizes

    model = copy.deepcopy(whole)
    sizes = compute_module_sizes(model)
    cpu = sizes["model.embed_tokens"] + sizes["model.layers.0"] + 1024
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={"cpu": cpu, "disk": 2**30}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert {"cpu", "disk"} <= set(device_map.values()), device_map
    model = accelerate.dispatch_model(model, device_map, main_device="cpu",
                                      offload_dir=str(tmp_path_factory.mktemp("offload")))
    offloaded = model.model.layers[LAYERS - 1].self_attn.q_proj.weight
    assert offloaded.device.type == "meta", "the last layer should live on disk, not in memory"
    return model


def compress_and_decode(model, method: str, ids: torch.Tensor):
    pipeline = build(method, budget=BUDGET)
    result = pipeline.prefill(model, ids)
    (tokens,) = decode_batch(model, result.cache, result.next_token_logits, NEW_TOKENS,
                             parse_generation_options({}), set())
    return result.report.kept_indices, tokens


@pytest.mark.parametrize("method", ["snapkv", "dapq"])
def test_dispatched_model_keeps_and_generates_the_same(whole, dispatched, method, single_threaded_torch):
    ids = random_ids(LENGTH, seed=5)
    kept, tokens = compress_and_decode(whole, method, ids)
    kept_dispatched, tokens_dispatched = compress_and_decode(dispatched, method, ids)
    assert sorted(kept) == sorted(kept_dispatched) == list(range(LAYERS))
    for layer, indices in kept.items():
        assert torch.equal(indices, kept_dispatched[layer]), f"layer {layer}"
        assert indices.shape[-1] == BUDGET
    assert tokens == tokens_dispatched and len(tokens) == NEW_TOKENS
