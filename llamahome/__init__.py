"""LlamaHome: train, fine-tune, evaluate and run Llama-family language models with JAX."""

__version__ = "0.1.0"
