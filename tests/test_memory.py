"""Peak memory measured in a fresh process per case (``kvpress_like.eval.memory``).

No memory *targets* here (they are benchmarks: see docs/results/benchmark.md); these tests check that
the measurement sees what a prefill physically must hold.
"""

from __future__ import annotations

import pytest

from kvpress_like.eval.memory import measure_case
from kvpress_like.eval.toy import save_toy_model


@pytest.fixture(scope="module")
def cache_heavy_model(tmp_path_factory):
    """A toy Llama whose cache outweighs its activations: 8 layers, 4 KV heads of dim 64."""
    return str(save_toy_model(tmp_path_factory.mktemp("toy"), layers=8, hidden_size=256, intermediate_size=256,
                              num_attention_heads=4, num_key_value_heads=4))


def test_a_plain_prefill_peaks_at_least_at_its_cache(cache_heavy_model):
    plain = measure_case(cache_heavy_model, "plain", 2048, "10%", threads=1)
    assert plain["cache_bytes"] == 8 * 2048 * 2 * 4 * 64 * 4  # layers × tokens × (K, V) × heads × dim × fp32
    assert plain["peak_bytes"] >= plain["cache_bytes"]
    assert plain["peak_cache_bytes"] is None and "VmHWM" in plain["measured"]


def test_a_compressed_prefill_reports_what_it_held(cache_heavy_model):
    dapq = measure_case(cache_heavy_model, "dapq", 2048, "10%", chunk_size=512, threads=1)
    assert dapq["chunk_size"] == 512
    assert dapq["cache_bytes"] == 8 * 205 * 2 * 4 * 64 * 4  # 10% of 2048 rounds to 205 tokens
    assert dapq["cache_bytes"] < dapq["peak_cache_bytes"] and dapq["peak_bytes"] > 0


def test_the_resident_set_follows_live_memory_so_runs_agree_and_compression_shows(cache_heavy_model):
    first, second = (measure_case(cache_heavy_model, "plain", 2048, "10%", threads=1) for _ in range(2))
    assert "mmap threshold 65536 bytes" in first["measured"]
    assert abs(first["peak_bytes"] - second["peak_bytes"]) <= 2**20
    snapkv = measure_case(cache_heavy_model, "snapkv", 2048, "10%", chunk_size=512, threads=1)
    assert snapkv["peak_bytes"] < first["peak_bytes"] - first["cache_bytes"] // 2  # most of the cache never existed


def test_a_failing_case_says_what_failed(cache_heavy_model):
    with pytest.raises(RuntimeError, match="memory case no_such_method at 64 tokens failed"):
        measure_case(cache_heavy_model, "no_such_method", 64, "10%")
