"""Logical axis rules: the one table that maps the model's axis names onto mesh axes.

The model names every parameter axis (vocab, embed, heads, kv_heads, head_dim, mlp, layers,
norm) and every activation axis (batch, length, embed, heads, kv_heads, mlp, vocab). A rule
`(name, mesh_axes)` shards that axis over those mesh axes; names without a rule are
replicated. Rules are tried in order and a mesh axis is used at most once per array, so
`batch` (listed first) takes `fsdp` on activations while `embed` takes it on parameters.

Presets, chosen in gin (`axis_rules.preset = "fsdp_tensor"`, see gin/train/parallel/):
- `data_parallel`: batch split over every axis, parameters replicated.
- `fsdp`: batch split over data x fsdp; parameters and optimizer state sharded on `embed`
  over fsdp (ZeRO-3 style: gathered per layer in the forward and backward passes).
- `fsdp_tensor`: fsdp plus Megatron-style tensor parallelism: heads, kv_heads, mlp and vocab
  over `tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import gin

from llamahome.errors import ConfigError, did_you_mean

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DATA_PARALLEL: Rules = (
    ("batch", ("data", "fsdp", "tensor")),
)
FSDP: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
)
FSDP_TENSOR: Rules = (
    ("batch", ("data", "fsdp")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
)
PRESETS: dict[str, Rules] = {"data_parallel": DATA_PARALLEL, "fsdp": FSDP, "fsdp_tensor": FSDP_TENSOR}


@gin.configurable
def axis_rules(preset: str = "fsdp", rules: Sequence[Sequence[object]] | None = None) -> Rules:
    """The rules of a named preset, or `rules` as given (a list of (name, mesh axes) pairs)."""
    if rules is not None:
        return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    if preset not in PRESETS:
        raise ConfigError(f"axis_rules.preset={preset!r} is not a preset.{did_you_mean(preset, PRESETS)} "
                          f"Presets: {', '.join(PRESETS)}; or bind axis_rules.rules")
    return PRESETS[preset]
