"""qwen-edge: one Qwen chat model, two roles (grammar-constrained sentiment, empathetic chat)."""
__version__ = "0.1.0"
