"""Built-in method plugins, one module per method (installed as ``kvpress_like.methods``)."""
