"""kvpress_like — pluggable KV-cache compression for Hugging Face transformers.

>>> from kvpress_like import build
>>> pipeline = build("dapq", budget=256)
"""

from kvpress_like import _source_layout  # noqa: F401  (first: methods/ and scorers/ in a source checkout)
from kvpress_like.adapters import ModelAdapter
from kvpress_like.attention import restore_attention, use_compressed_attention
from kvpress_like.budget import Budget
from kvpress_like.cache import CompressedCache
from kvpress_like.catalog import list_parts
from kvpress_like.decode_compression import DecodeEvents, DecodingReport
from kvpress_like.decode_schedule import DecodingConfig
from kvpress_like.errors import (
    ConfigError,
    DuplicateRegistrationError,
    KVPressLikeError,
    UnknownNameError,
    UnsupportedInputError,
    UnsupportedModelError,
)
from kvpress_like.factory import build, build_from_spec
from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice
from kvpress_like.pipeline import Pipeline
from kvpress_like.plugins import register_plugin, unregister_plugin
from kvpress_like.prefill import PrefillResult, prefill_many
from kvpress_like.report import CompressionReport, LayerReport
from kvpress_like.scorers.attention import window_attention

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CompressedCache",
    "CompressionReport",
    "ConfigError",
    "DecodeEvents",
    "DecodingConfig",
    "DecodingReport",
    "DuplicateRegistrationError",
    "KVPressLikeError",
    "LayerReport",
    "MethodSpec",
    "ModelAdapter",
    "PartChoice",
    "Pipeline",
    "PrefillResult",
    "UnknownNameError",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "build",
    "build_from_spec",
    "hookimpl",
    "list_parts",
    "prefill_many",
    "register_plugin",
    "restore_attention",
    "unregister_plugin",
    "use_compressed_attention",
    "window_attention",
]
