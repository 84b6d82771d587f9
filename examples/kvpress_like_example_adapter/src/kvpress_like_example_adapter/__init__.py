"""An example kvpress_like plugin that adds an architecture; its hook is in :mod:`.adapter`."""

__version__ = "0.1.0"
