"""The lean MLPs of a compressed prefill: bit-identical outputs, row chunks, the model's modules put back."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.plugins import get_adapter
from kvpress_like.position_wise import LeanMLP, is_gated, lean_mlps

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.mark.parametrize(("arch", "gated"), [("llama", True), ("qwen3", True), ("gemma3", True), ("phi3", False)])
def test_gated_mlps_are_recognised_by_their_parts(arch, gated):
    mlp = tiny_model(arch).model.layers[0].mlp
    assert is_gated(mlp) is gated


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen3", "gemma3", "phi3"]), length=st.integers(1, 50),
       rows=st.one_of(st.none(), st.integers(1, 60)))
def test_lean_mlp_output_is_the_mlps(arch, length, rows):
    """Bit-identical in one piece; in row chunks up to the matrix kernels' rounding (a product of 1 row and
    one of many rows may round differently)."""
    mlp = tiny_model(arch).model.layers[0].mlp
    hidden = torch.randn(2, length, mlp.down_proj.out_features, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        lean, plain = LeanMLP(mlp, rows)(hidden), mlp(hidden)
    if rows is None or rows >= length:
        assert torch.equal(lean, plain)
    else:
        torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-6)


class RecordingActivation(torch.nn.Module):
    """The MLP's activation, noting where its output lives (a module, not a hook: hooks turn the lean path off)."""

    def __init__(self, inner: torch.nn.Module, seen: dict):
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x):
        out = self.inner(x)
        self.seen["act"] = out.data_ptr()
        return out


@pytest.mark.parametrize(("lean", "shared"), [(True, True), (False, False)])
def test_the_gated_product_goes_into_the_activations_buffer(lean, shared):
    """Lean: down_proj reads the activation's own buffer (no third intermediate-sized tensor); the model's
    own MLP allocates a new one for the product."""
    mlp = copy.deepcopy(tiny_model("llama").model.layers[0].mlp)
    seen = {}
    mlp.act_fn = RecordingActivation(mlp.act_fn, seen)
    mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.update(product=args[0].data_ptr()))
    with torch.no_grad():
        (LeanMLP(mlp) if lean else mlp)(torch.randn(1, 8, mlp.gate_proj.in_features))
    assert (seen["act"] == seen["product"]) is shared


def test_lean_mlps_put_the_models_modules_back_on_error():
    model = tiny_model("llama")
    originals = [layer.mlp for layer in model.model.layers]
    with pytest.raises(RuntimeError, match="boom"), lean_mlps(get_adapter(model).decoder.layers, rows=4):
        assert all(isinstance(layer.mlp, LeanMLP) for layer in model.model.layers)
        raise RuntimeError("boom")
    assert [layer.mlp for layer in model.model.layers] == originals


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_compressed_prefill_gives_the_plain_forwards_logits(arch):
    """The full method's one-pass prefill (lean MLPs) and the model's own forward agree bit for bit."""
    model = tiny_model(arch)
    ids = random_ids(30)
    with torch.no_grad():
        plain = model(ids, logits_to_keep=1).logits[:, -1]
    assert torch.equal(build("full").prefill(model, ids).next_token_logits, plain)


def test_hooks_and_gradients_get_the_models_own_mlp():
    """A hook on the activation sees the activation, not the product written over it; with gradients the MLP runs
    as it is (the in-place product would break autograd)."""
    mlp = tiny_model("llama").model.layers[0].mlp
    hidden = torch.randn(1, 6, mlp.gate_proj.in_features)
    kept = []
    handle = mlp.act_fn.register_forward_hook(lambda m, args, out: kept.append(out))
    try:
        with torch.no_grad():
            LeanMLP(mlp)(hidden)
            assert torch.equal(kept[0], mlp.act_fn(mlp.gate_proj(hidden)))
    finally:
        handle.remove()
    leaf = hidden.clone().requires_grad_()
    LeanMLP(mlp)(leaf).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
