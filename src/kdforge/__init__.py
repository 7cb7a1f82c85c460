"""kdforge: distil a large teacher language model into a small student, and keep it learning."""

__version__ = "0.1.0"
