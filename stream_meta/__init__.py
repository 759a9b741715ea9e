"""stream-meta: a well-adapted model for every task in a stream, from its first few examples."""

__version__ = "0.1.0"

__all__ = ["__version__"]
