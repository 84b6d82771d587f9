"""Tiny random-init models of every registered architecture, for tests, property checks and plugins.

They are built from configs (no download) in milliseconds: ``make_model("qwen3", attn_implementation="eager")``.
``ARCHITECTURES`` maps each registered adapter that declares a ``tiny_config`` (built-in or from a
plugin) to its class, by adapter name; it is read from the registry each time it is imported.
:func:`attention_mismatch` checks an adapter against the model's own attention.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel

from kvpress_like.adapters import ModelAdapter
from kvpress_like.compat import model_inputs
from kvpress_like.errors import UnknownNameError
from kvpress_like.plugins import get_adapter, get_registry

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=4096)


def architectures() -> dict[str, type[ModelAdapter]]:
    """Adapter name → class, for every registered adapter with a tiny test model, in registration order."""
    return {name: cls for name, cls in get_registry().architectures.items() if cls.tiny_config is not None}


def __getattr__(name: str) -> Any:
    if name == "ARCHITECTURES":
        return architectures()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random-init causal LM of the registered architecture ``arch``, in eval mode.

    The config is that of the adapter's first model type, with :data:`COMMON`, the adapter's
    ``tiny_config`` and ``overrides`` on top.
    """
    available = architectures()
    if arch not in available:
        raise UnknownNameError("architecture", arch, list(available))
    adapter = available[arch]
    config = AutoConfig.for_model(adapter.model_types[0], **{**COMMON, **adapter.tiny_config, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def make_gpt2() -> torch.nn.Module:
    """A tiny GPT-2: an architecture without an adapter."""
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)).eval()


@torch.no_grad()
def attention_mismatch(arch: str, adapter: type[ModelAdapter] | None = None, length: int = 12) -> float:
    """How far the queries an adapter recomputes are from the model's own: the largest difference of attention
    probabilities over every layer of a tiny eager ``arch`` model (~1e-7 when the adapter is right).

    A naive reference: the attention inputs each module receives are captured in one forward, the
    adapter's :meth:`~ModelAdapter.window_queries` are recomputed from them and put through a causal
    softmax against the keys the model cached; the model's own probabilities come from
    ``output_attentions``. ``adapter`` defaults to the registered one; ``length`` stays below any
    sliding window, so one causal mask fits every layer.
    """
    model = make_model(arch, attn_implementation="eager")
    adapter = adapter or type(get_adapter(model))
    modules = adapter(model).attention_modules()
    inputs = {}

    def capture(module, args, kwargs) -> None:
        inputs[module.layer_idx] = (kwargs["hidden_states"], *kwargs["position_embeddings"])

    handles = [module.register_forward_pre_hook(capture, with_kwargs=True) for module in modules]
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    try:
        attentions = model(**model_inputs(model, cache, input_ids=ids, output_attentions=True)).attentions
    finally:
        for handle in handles:
            handle.remove()
    causal = torch.full((length, length), float("-inf")).triu(1)
    worst = 0.0
    for module in modules:
        queries = adapter.window_queries(module, *inputs[module.layer_idx])
        keys = cache.layers[module.layer_idx].keys
        keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
        probs = (queries @ keys.transpose(-1, -2) * module.scaling + causal).softmax(dim=-1)
        worst = max(worst, float((probs - attentions[module.layer_idx]).abs().max()))
    return worst


_FITTED: dict[tuple[int, str], Any] = {}  # (id of a model, teacher family) -> a folder that lives with the process


def with_fitted_surrogate(pipeline, model):
    """``pipeline``, its learned scorer (if it names a shipped artifact, ``shipped:<teacher>``) replaced by one fitted
    on ``model`` from its teacher's scores on a few random prompts: learned methods on tiny random models, which
    no shipped artifact fits. Any other pipeline is returned as it is."""
    import tempfile

    from kvpress_like.scorers.learned import SHIPPED, LearnedConfig, LearnedScorer
    from kvpress_like.train_scorer import Prompt, TrainingSettings, teacher_pipeline, train_scorer

    scorer = pipeline.scorer
    if not isinstance(scorer, LearnedScorer) or not scorer.config.artifact.startswith(SHIPPED):
        return pipeline
    family = scorer.config.artifact.removeprefix(SHIPPED)
    key = (id(model), family)
    if key not in _FITTED:
        folder = tempfile.TemporaryDirectory(prefix=f"kvpress-like-{family}-")
        generator = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        prompts = [Prompt(i, torch.randint(0, vocab, (1, 48), generator=generator), 0, 48) for i in range(6)]
        settings = TrainingSettings(docs=6, held_out=2, tokens_per_doc=32)
        train_scorer(model, None, teacher_pipeline(family, None), folder.name, settings, "a tiny random model",
                     prompts=prompts, data={"documents": "6 random prompts of 48 ids"})
        _FITTED[key] = folder
    pipeline.scorer = LearnedScorer(LearnedConfig(artifact=_FITTED[key].name))
    return pipeline
