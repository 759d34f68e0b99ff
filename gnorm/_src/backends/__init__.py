"""Each platform's lowering of the maths: a module per backend (``dispatch.py`` picks)."""
