"""An example kvpress_like plugin; the hooks live in :mod:`kvpress_like_example_plugin.plugin`."""

__version__ = "0.1.0"
