"""Inference: KV-cache generation, samplers, perplexity, and the `generate` / `evaluate` jobs."""
