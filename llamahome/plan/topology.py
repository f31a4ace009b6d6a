"""TPU topologies by name, the chips they hold, and their compile-only devices (libtpu on any host).

Names, as Google Cloud's accelerator types and MaxText's `compile_topology` spell them:

    v5p-128        v4 and v5p: the number counts TensorCores, 2 per chip (megacore): 64 chips
    v5e-16         v5e and v6e: the number counts chips (1 TensorCore each): 16 chips
    v6e-256
    v5p:4x4x4      the physical chip grid (3-D for v4/v5p, 2-D for v5e/v6e): 64 chips
    2xv5p-256      `<n>x` before either form: n slices joined by the data-center network

A user-facing name's chip grid is MaxText's (accelerator_to_spec_map.py) for the power-of-two
sizes: start from 2x2x1 (v4, v5p) or 2x2 (v5e, v6e) and double the last of the smallest
dimensions, e.g. v5p-8 = 2x2x1, v5p-64 = 2x4x4, v5p-512 = 4x8x8, v5e-16 = 4x4; other sizes
are given as a grid (`v5p:4x4x12`).

`compile_devices(topology)` asks libtpu (`pip install -e '.[tpu]'`) for the topology's devices
through `jax.experimental.topologies`; they compile but cannot run, and nothing claims a TPU:
the process's own backend stays what JAX_PLATFORMS says (CPU on a CPU host). With libtpu
installed and JAX_PLATFORMS unset, JAX's backend start-up would probe for a TPU and libtpu
print a few errors before falling back to the CPU; every job's start
(`distributed.cpu_only_despite_libtpu`) tells JAX "cpu" on a host without TPU chips or a GPU
plugin, so the probe never runs (`jax.devices()` takes 1.2-1.5 s with or without libtpu on
the 2-core test host).

Per-chip figures (Cloud TPU system architecture pages, 2026-12): HBM 32 GiB (v4), 95 GiB
(v5p), 16 GiB (v5e), 32 GiB (v6e) (the v5p and v6e pages write "GB"; read here as GiB, which
a fit check must confirm on the hardware); HBM bandwidth 1200, 2765, 819 and 1640 GB/s; peak
bf16 FLOP/s 275, 459, 197 and 918 TFLOP/s (the same as llamahome.monitor's table, which
tests/unit/plan/test_topology.py checks; this module stays below monitor in the layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Iterator

from llamahome.errors import ConfigError, did_you_mean

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: how its names count, its grid, its HBM and its libtpu name."""

    name: str  # as in accelerator types: v4, v5p, v5e, v6e
    device_kind: str  # what jax.Device.device_kind says
    hbm_bytes: int
    cores_per_chip_in_name: int  # 2: `v5p-8` is 8 TensorCores = 4 chips
    grid_dims: int  # 3: a 3-D torus (v4, v5p); 2: a 2-D one (v5e, v6e)
    libtpu_name: str  # the prefix libtpu's topology names take
    megacore: bool  # one JAX device per chip (both TensorCores)
    max_chips: int  # the largest single slice
    hbm_bandwidth: float  # bytes/s of one chip's HBM
    peak_flops: float  # dense bf16 FLOP/s of one chip (as llamahome.monitor's table)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 2, 3, "v4", True, 4096, 1200e9, 275e12),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 2, 3, "v5p", True, 8960, 2765e9, 459e12),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 1, 2, "v5e", False, 256, 819e9, 197e12),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 1, 2, "v6e", False, 256, 1640e9, 918e12),
}
ALIASES = {"v5litepod": "v5e", "v5": "v5p"}
_NAME = re.compile(r"^(?:(\d+)x)?([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))$")
EXAMPLES = "v5p-8, v5p-128, v4-32, v5e-16, v6e-256, v5p:4x4x12, 2xv5p-256"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named TPU target: `num_slices` slices of `grid` chips of `chip`."""

    name: str
    chip: Chip
    grid: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.grid))}"

    def describe(self) -> dict:
        """The topology as plan.json records it."""
        return {"name": self.name, "chip": self.chip.name, "grid": "x".join(map(str, self.grid)),
                "slices": self.num_slices, "chips": self.num_chips,
                "hbm_bytes_per_chip": self.chip.hbm_bytes,
                "peak_bf16_flops_per_chip": self.chip.peak_flops}


def default_grid(chips: int, dims: int) -> tuple[int, ...] | None:
    """MaxText's chip grid for a power-of-two slice of `chips` (None for other sizes)."""
    grid = [2, 2, 1] if dims == 3 else [2, 2]
    if chips == 1 and dims == 2:
        return (1, 1)
    if chips < math.prod(grid) or chips & (chips - 1):
        return None
    while math.prod(grid) < chips:
        smallest = min(grid)
        grid[max(i for i, g in enumerate(grid) if g == smallest)] *= 2
    return tuple(grid)


def parse_topology(name: str) -> Topology:
    """`v5p-128`, `v5e:4x4`, `2xv6e-256`, ... -> Topology; a ConfigError names what is wrong."""
    match = _NAME.match(name.strip().lower())
    if not match:
        raise ConfigError(f"plan.topology={name!r} is not a TPU topology name; use e.g. {EXAMPLES}")
    slices, generation, count, grid = match.groups()
    generation = ALIASES.get(generation, generation)
    if generation not in CHIPS:
        raise ConfigError(f"plan.topology={name!r}: unknown TPU generation {generation!r}."
                          f"{did_you_mean(generation, CHIPS)} Known: {', '.join(CHIPS)}")
    chip = CHIPS[generation]
    if grid is not None:
        shape = tuple(int(g) for g in grid.split("x"))
        if len(shape) != chip.grid_dims or min(shape) < 1:
            raise ConfigError(f"plan.topology={name!r}: a {chip.name} grid has {chip.grid_dims} "
                              f"dimensions of at least 1 chip, e.g. {_example_grid(chip)}")
    else:
        cores = int(count)
        if cores % chip.cores_per_chip_in_name:
            raise ConfigError(f"plan.topology={name!r}: {chip.name}-N counts TensorCores, "
                              f"{chip.cores_per_chip_in_name} per chip; N must be even")
        chips = cores // chip.cores_per_chip_in_name
        shape = default_grid(chips, chip.grid_dims)
        if shape is None:
            raise ConfigError(f"plan.topology={name!r}: no default chip grid for {chips} {chip.name} "
                              f"chips (power-of-two sizes only); give the grid, e.g. "
                              f"'{chip.name}:{_example_grid(chip)}'")
    if math.prod(shape) > chip.max_chips:
        raise ConfigError(f"plan.topology={name!r}: {math.prod(shape)} chips is more than a "
                          f"{chip.name} slice holds ({chip.max_chips}); use several slices, e.g. "
                          f"'2x{chip.name}-...'")
    num_slices = int(slices) if slices else 1
    if num_slices < 1:
        raise ConfigError(f"plan.topology={name!r}: the slice count must be at least 1")
    return Topology(name, chip, shape, num_slices)


def _example_grid(chip: Chip) -> str:
    return "4x4x12" if chip.grid_dims == 3 else "4x8"


@contextlib.contextmanager
def _compile_only_env() -> Iterator[None]:
    """Settings libtpu reads when it first loads, for compiling only, restored afterwards (so
    that nothing else, e.g. llamahome.parallel.distributed, takes this host for a TPU worker):
    - worker hostnames and bounds: without them, on a host that is no TPU VM, libtpu prints
      warnings about hostnames it could not look up;
    - ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes /tmp/libtpu_lockfile, and a second
      plan (or test) running at the same time fails with "Internal error when accessing libtpu
      multi-process lockfile"; with no TPU to share there is nothing to lock."""
    settings = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1",
                "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    saved = {k: os.environ.get(k) for k in settings}
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def libtpu_problem() -> str | None:
    """Why TPU topologies cannot be compiled for here (libtpu missing), or None."""
    try:
        import libtpu  # noqa: F401  (the package jax[tpu] installs)
    except ImportError:
        return ("libtpu is not installed: compiling for a TPU topology needs it on this host too "
                "(pip install -e '.[tpu]')")
    return None


def compile_devices(topology: Topology) -> list:
    """The topology's devices, compile-only (libtpu): for `jax.jit(...).lower(...).compile()`."""
    problem = libtpu_problem()
    if problem:
        raise ConfigError(f"plan.topology={topology.name!r}: {problem}")
    from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu's plugin lazily)

    kwargs = {"chip_config_name": "megacore"} if topology.chip.megacore else {}
    if topology.num_slices > 1:
        kwargs["num_slices"] = topology.num_slices
    with _compile_only_env():
        try:
            description = topologies.get_topology_desc(
                topology_name=topology.libtpu_name, platform="tpu", **kwargs)
        except Exception as e:  # noqa: BLE001  (libtpu's refusal is a JaxRuntimeError)
            raise ConfigError(f"plan.topology={topology.name!r} ({topology.libtpu_name}): libtpu "
                              f"refused it: {str(e).splitlines()[0]}") from None
    return list(description.devices)
