"""Built-in scorer plugins, one module per scorer (installed as ``kvpress_like.scorers``)."""
