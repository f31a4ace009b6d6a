"""Raw documents to packed batches: sources, tokenizers, the token cache, the Grain pipeline."""
