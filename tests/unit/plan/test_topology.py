"""TPU topology names -> chips and grids, checked against Google Cloud's and MaxText's tables."""

from __future__ import annotations

import pytest

from llamahome.errors import ConfigError
from llamahome.monitor import PEAK_BF16_FLOPS, lookup_peak
from llamahome.plan.topology import CHIPS, GiB, compile_devices, libtpu_problem, parse_topology

# (name, grid, chips): MaxText's accelerator_to_spec_map.py and the Cloud TPU v5p / v5e pages.
KNOWN = [("v5p-8", (2, 2, 1), 4), ("v5p-16", (2, 2, 2), 8), ("v5p-32", (2, 2, 4), 16),
         ("v5p-64", (2, 4, 4), 32), ("v5p-128", (4, 4, 4), 64), ("v5p-256", (4, 4, 8), 128),
         ("v5p-512", (4, 8, 8), 256), ("v5p-1024", (8, 8, 8), 512), ("v4-8", (2, 2, 1), 4),
         ("v4-4096", (8, 16, 16), 2048), ("v5e-16", (4, 4), 16), ("v5e-128", (8, 16), 128),
         ("v5e-256", (16, 16), 256), ("v6e-8", (2, 4), 8), ("v6e-256", (16, 16), 256),
         ("v5litepod-32", (4, 8), 32), ("v5p:4x4x12", (4, 4, 12), 192)]


@pytest.mark.parametrize("name, grid, chips", KNOWN)
def test_names_give_maxtexts_grids(name, grid, chips):
    topology = parse_topology(name)
    assert topology.grid == grid
    assert topology.num_chips == chips and topology.num_slices == 1


def test_multislice_names():
    topology = parse_topology("2xv5p-256")
    assert (topology.num_slices, topology.chips_per_slice, topology.num_chips) == (2, 128, 256)
    assert topology.libtpu_name == "v5p:4x4x8"


def test_chip_table():
    assert {k: c.hbm_bytes // GiB for k, c in CHIPS.items()} == {"v4": 32, "v5p": 95, "v5e": 16,
                                                                  "v6e": 32}
    assert {k: c.peak_flops / 1e12 for k, c in CHIPS.items()} == {"v4": 275, "v5p": 459,
                                                                   "v5e": 197, "v6e": 918}
    # The same figures as the MFU the train job logs on those chips (llamahome/monitor.py).
    assert all(c.peak_flops == lookup_peak(c.device_kind, PEAK_BF16_FLOPS) for c in CHIPS.values())


@pytest.mark.parametrize("name, message", [
    ("v7x-8", "unknown TPU generation 'v7x'"),
    ("v5q-8", "Did you mean 'v5p'"),
    ("v5p-7", "N must be even"),
    ("v5p-24", "give the grid, e.g. 'v5p:4x4x12'"),
    ("v5e:2x2x2", "a v5e grid has 2 dimensions"),
    ("v5e-512", "more than a v5e slice holds (256)"),
    ("tpu-v5p", "is not a TPU topology name"),
    ("0xv5p-8", "slice count must be at least 1"),
])
def test_bad_names_say_what_is_wrong(name, message):
    with pytest.raises(ConfigError, match="plan.topology=") as error:
        parse_topology(name)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_compile_devices():
    if libtpu_problem():
        pytest.skip(libtpu_problem())
    devices = compile_devices(parse_topology("v5p-8"))
    assert len(devices) == 4 and {d.device_kind for d in devices} == {"TPU v5"}
    two = compile_devices(parse_topology("2xv5p-8"))
    assert len(two) == 8 and sorted({d.slice_index for d in two}) == [0, 1]
    assert len(compile_devices(parse_topology("v4-8"))) == 4  # megacore: one device per chip
