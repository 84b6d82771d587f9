"""A toy model folder for smoke runs of the harness without any real model: a byte-level tokenizer
(256 byte tokens + BOS/EOS, no merges, no chat template) and a tiny random-init Llama.

``save_toy_model(path)`` writes a folder that ``load_model(path)`` and every CLI command accept.
The toy model answers nonsense; use it to check plumbing, files and resumption, not quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

BOS, EOS = "<s>", "</s>"


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the 256 bytes (ids 0–255) plus ``<s>`` (256) and ``</s>`` (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab.update({BOS: 256, EOS: 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def toy_model(seed: int = 0, layers: int = 2, **overrides):
    """A tiny random Llama (GQA 4 q / 2 kv heads, head_dim 16) with the byte tokenizer's vocabulary.

    ``overrides`` change the ``LlamaConfig`` (e.g. ``max_position_embeddings`` for long prompts).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{
        "vocab_size": 258, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257, **overrides,
    })
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_toy_model(path: str | Path, seed: int = 0, layers: int = 2, **overrides) -> Path:
    """Write the toy model (see :func:`toy_model`) and tokenizer to ``path`` (a transformers folder)."""
    path = Path(path)
    toy_model(seed, layers, **overrides).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
