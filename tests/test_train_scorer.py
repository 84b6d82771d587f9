"""train-scorer end to end on a tiny model: it recovers a planted linear scorer, is reproducible, resumes; the
training data is disjoint from every evaluation; the threshold selector keeps exactly what passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import full_prefill, random_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.errors import ConfigError
from kvpress_like.parts import LayerContext, Scorer
from kvpress_like.selection import ThresholdConfig, ThresholdSelector
from kvpress_like.surrogate import load_surrogate
from kvpress_like.train_corpus import FACT_TEMPLATE, TRAIN_SEED_BASE, docstring_paragraphs, training_document
from kvpress_like.train_scorer import Prompt, TrainingSettings, train_scorer

GRIDS = Path(__file__).parent.parent / "docs" / "results" / "grids"


class PlantedScorer(Scorer):
    """A known linear map from the attention input to one score per KV head, the same in every layer."""

    name = "planted"
    reads_hidden_states = True

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.weight = torch.randn(hidden, heads, generator=generator)
        self.bias = torch.randn(heads, generator=generator)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return (ctx.hidden_states.float() @ self.weight + self.bias).transpose(1, 2)


def planted_teacher(model):
    teacher = build("knorm", budget=0.5)
    teacher.scorer = PlantedScorer(model.config.hidden_size, model.config.num_key_value_heads)
    return teacher


def prompts(n: int, length: int = 40):
    return [Prompt(i, random_ids(length, seed=100 + i), 0, length) for i in range(n)]


def train(model, folder, teacher=None, kind="linear", docs=10, **extra):
    options = TrainingSettings(kind=kind, docs=docs, held_out=2, tokens_per_doc=32, target="raw", alpha=1e-6, **extra)
    return train_scorer(model, None, teacher or planted_teacher(model), folder, options, "tiny",
                        prompts=prompts(docs), data={"documents": "random ids"})


def test_the_trainer_recovers_a_planted_linear_scorer(tmp_path):
    model = tiny_model("llama", num_key_value_heads=2)
    surrogate = train(model, tmp_path)
    planted = planted_teacher(model).scorer
    for layer, weights in surrogate.layers.items():
        torch.testing.assert_close(weights["weight"], planted.weight, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(weights["bias"], planted.bias, rtol=2e-2, atol=2e-2)
        assert surrogate.meta["metrics"][str(layer)]["r2"] > 0.999
        assert surrogate.meta["metrics"][str(layer)]["spearman"] > 0.99
    assert load_surrogate(tmp_path).meta["teacher"]["family"] == "knorm"


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_same_command_and_seed_give_the_same_weights(tmp_path, kind):
    model = tiny_model("llama")
    first = train(model, tmp_path / "a", kind=kind, epochs=2)
    second = train(model, tmp_path / "b", kind=kind, epochs=2)
    for layer, weights in first.layers.items():
        for name, tensor in weights.items():
            torch.testing.assert_close(second.layers[layer][name], tensor, rtol=1e-6, atol=1e-6)


def test_a_stopped_collection_resumes_to_the_same_artifact(tmp_path):
    model = tiny_model("llama")

    def stopping(items):
        for n, item in enumerate(items):
            if n == 4:
                raise KeyboardInterrupt
            yield item

    settings_ = TrainingSettings(docs=10, held_out=2, tokens_per_doc=32, target="raw", alpha=1e-6)
    with pytest.raises(KeyboardInterrupt):
        train_scorer(model, None, planted_teacher(model), tmp_path / "resumed", settings_, "tiny",
                     prompts=prompts(10), data={}, progress=stopping)
    assert len(list((tmp_path / "resumed" / "collect").glob("doc-*.safetensors"))) == 4
    resumed = train_scorer(model, None, planted_teacher(model), tmp_path / "resumed", settings_, "tiny",
                           prompts=prompts(10), data={})
    fresh = train_scorer(model, None, planted_teacher(model), tmp_path / "fresh", settings_, "tiny",
                         prompts=prompts(10), data={})
    for layer, weights in fresh.layers.items():
        torch.testing.assert_close(resumed.layers[layer]["weight"], weights["weight"])
    with pytest.raises(ConfigError, match="other settings"):
        train_scorer(model, None, planted_teacher(model), tmp_path / "fresh", settings_.model_copy(update={"seed": 1}),
                     "tiny", prompts=prompts(10), data={})


def test_the_held_out_documents_must_leave_some_to_train():
    with pytest.raises(ConfigError, match="held_out"):
        TrainingSettings(docs=4, held_out=4).check()


def evaluation_seeds() -> set[int]:
    seeds = set(range(0, 10 + 1))  # the eval CLI's defaults: seed 0, 10 samples
    for path in GRIDS.glob("*.yaml"):
        grid = yaml.safe_load(path.read_text())
        start, samples = grid.get("seed", 0), grid.get("samples", 10)
        seeds |= set(range(start, start + samples))
    return seeds


def test_training_seeds_prose_and_templates_are_disjoint_from_every_evaluation():
    from pydoc_data.topics import topics

    from kvpress_like.eval.haystack import prose_paragraphs

    assert len(list(GRIDS.glob("*.yaml"))) > 10
    assert max(evaluation_seeds()) < TRAIN_SEED_BASE
    assert not set(docstring_paragraphs()) & set(prose_paragraphs())
    assert "Archive note" not in " ".join(topics.values())

    class Words:
        def encode(self, text, add_special_tokens=False):
            return text.split()

    document = training_document(Words(), 1, 400)
    assert document.count("Archive note") == 4 and FACT_TEMPLATE.split(":")[0] in document
    for phrase in ("special magic number", "pass key", "magic number for"):
        assert phrase not in document.lower()


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 40), heads=st.integers(1, 3), threshold=st.floats(-1.5, 1.5),
       sinks=st.integers(0, 4), recent=st.integers(0, 6), cap=st.integers(0, 40), seed=st.integers(0, 10**6))
def test_threshold_keeps_the_protected_tokens_and_those_that_pass(length, heads, threshold, sinks, recent, cap, seed):
    selector = ThresholdSelector(ThresholdConfig(threshold=threshold, sinks=sinks, recent=recent))
    scores = torch.randn(1, heads, length, generator=torch.Generator().manual_seed(seed))
    protected = selector.protected_mask(length, length, scores.device)
    cap = max(cap, int(protected.sum()))
    counts = selector.head_counts(scores, protected, cap)
    for h in range(heads):
        passing = protected | (scores[0, h] >= threshold)
        assert int(counts[0, h]) == min(int(passing.sum()), cap)
        kept = selector.select(scores[:, h : h + 1], int(counts[0, h]))[0, 0]
        assert set(torch.nonzero(protected).flatten().tolist()) <= set(kept.tolist())
        if int(passing.sum()) <= cap:
            assert set(kept.tolist()) == set(torch.nonzero(passing).flatten().tolist())


def test_a_threshold_prefill_keeps_what_passes_and_reports_the_share_it_reached():
    model = tiny_model("llama", num_key_value_heads=2)
    ids = random_ids(40, seed=3)
    with torch.no_grad():
        cache, _ = full_prefill(model, ids)
    scores = {i: -cache.layers[i].keys.float().norm(dim=-1) for i in range(len(cache.layers))}  # knorm's scores
    threshold = float(scores[0].median())
    pipeline = build("knorm", allocator="full", selector={"name": "threshold", "threshold": threshold, "recent": 4})
    report = pipeline.prefill(model, ids).report
    protected = (torch.arange(40) < 4) | (torch.arange(40) >= 36)
    for i, layer in report.layers.items():
        passing = protected | (scores[i] >= threshold)
        assert torch.equal(layer.kept_counts, passing.sum(dim=-1))
        for h in range(2):
            assert torch.equal(layer.kept_indices[0][h], torch.nonzero(passing[0, h]).flatten())
    shares = [float(layer.kept_counts.double().mean()) / 40 for layer in report.layers.values()]
    expected = sum(shares) / len(shares)
    assert report.kept_fraction == pytest.approx(expected) and report.kept_fraction < 1.0


def test_a_threshold_selector_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="decode-time"):
        build("knorm", allocator="full", selector={"name": "threshold", "threshold": 0.0},
              decoding={"interval": 4, "target": 8})
    with pytest.raises(ConfigError, match="per-layer allocator"):
        build("knorm", budget=0.5, allocator="global_layers", selector={"name": "threshold", "threshold": 0.0})
