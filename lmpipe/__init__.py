"""lmpipe: a reproducible pipeline from a raw corpus to a family of language models."""

__version__ = "0.1.0"
