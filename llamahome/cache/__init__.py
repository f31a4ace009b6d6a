"""Caches with budgets: token caches on disk, loaded arrays in memory, JAX's compilation cache."""

from llamahome.cache.manager import CacheManager

__all__ = ["CacheManager"]
