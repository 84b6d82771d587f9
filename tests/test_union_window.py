"""The union window scores with the suffix window's queries and the pseudo queries together."""

from __future__ import annotations

import torch

from kvpress_like import build, hookimpl, register_plugin, unregister_plugin
from kvpress_like.parts import Scorer
from kvpress_like.testing import make_model

RECORDED: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}


class RecordingScorer(Scorer):
    """Records the queries it is given, then scores by key norm (any valid score will do)."""

    name = "test_recording"
    summary = "records ctx.queries and ctx.query_rows for the test"

    def score(self, ctx):
        RECORDED.setdefault(self.tag, {})[ctx.layer_idx] = (ctx.queries.clone(), ctx.query_rows.clone())
        return -ctx.keys[:, :, : ctx.prompt_length].norm(dim=-1)


class Plugin:
    @hookimpl
    def register_scorers(self):
        return [RecordingScorer]


def recorded_queries(model, ids, window: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    pipeline = build("dapq", budget=20, window=window, scorer="test_recording")
    pipeline.scorer.tag = window["name"]
    pipeline.prefill(model, ids)
    return RECORDED[window["name"]]


def test_union_queries_are_suffix_queries_then_pseudo_queries():
    plugin = Plugin()
    register_plugin(plugin)
    try:
        for arch in ("llama", "qwen3", "gemma3"):
            model = make_model(arch)
            ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(3))
            union = recorded_queries(model, ids, {"name": "union", "size": 8, "n_pseudo": 6, "prefix": 2})
            suffix = recorded_queries(model, ids, {"name": "suffix", "size": 8})
            pseudo = recorded_queries(model, ids, {"name": "pseudo", "n_pseudo": 6, "prefix": 2})
            assert union.keys() == suffix.keys() == pseudo.keys() and union
            for layer, (queries, rows) in union.items():
                assert rows.tolist() == list(range(62, 70)) + list(range(70, 76))
                expected = torch.cat([suffix[layer][0], pseudo[layer][0]], dim=2)
                torch.testing.assert_close(queries, expected, atol=1e-5, rtol=1e-5)
    finally:
        unregister_plugin(plugin)
