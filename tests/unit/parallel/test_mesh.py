"""build_mesh axis sizes and the logical rules' mapping onto mesh axes."""

import flax.linen as nn
import pytest
from jax.sharding import PartitionSpec as P

from llamahome.errors import ConfigError
from llamahome.parallel.mesh import build_mesh, resolve_axis_sizes
from llamahome.parallel.rules import axis_rules


def test_resolve_axis_sizes():
    assert resolve_axis_sizes((1, -1, 1), 8) == (1, 8, 1)
    assert resolve_axis_sizes((2, -1, 2), 8) == (2, 2, 2)
    assert resolve_axis_sizes((-1, 1, 1), 8) == (8, 1, 1)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_axis_sizes((3, -1, 1), 8)
    with pytest.raises(ConfigError, match="at most one"):
        resolve_axis_sizes((-1, -1, 1), 8)
    with pytest.raises(ConfigError, match="use 4 devices"):
        resolve_axis_sizes((2, 2, 1), 8)


def test_build_mesh(eight_devices):
    mesh = build_mesh(data=2, fsdp=-1, tensor=2, devices=eight_devices)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in eight_devices)


@pytest.mark.parametrize("preset, param, activation", [
    ("data_parallel", P(None, None), P(("data", "fsdp", "tensor"), None, None)),
    ("fsdp", P("fsdp", None), P(("data", "fsdp"), None, None)),
    ("fsdp_tensor", P("fsdp", "tensor"), P(("data", "fsdp"), None, None)),
])
def test_presets_map_params_and_activations(preset, param, activation):
    rules = axis_rules(preset)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == param
    # `batch` claims fsdp first, so the embed axis of an activation stays replicated.
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == activation


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="Did you mean 'fsdp_tensor'"):
        axis_rules("fsdp_tensr")


def test_custom_rules_from_gin_lists():
    rules = axis_rules(rules=[["batch", ["data", "fsdp"]], ["mlp", "tensor"]])
    assert nn.logical_to_mesh_axes(("batch", "mlp"), rules) == P(("data", "fsdp"), "tensor")
