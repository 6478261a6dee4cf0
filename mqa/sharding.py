"""The device mesh and how parameters and batches are laid out on it.

Three mesh axes serve a research codebase: `data` (pure data parallelism), `fsdp` (data
parallelism with parameters and optimizer state sharded too) and `tensor` (attention heads
and MLP width split across devices). Parameters are placed by rules on their names; a
dimension that does not divide its mesh axis is replicated instead, which is what MQA's
single K/V head needs when the tensor axis is wider than `num_kv_heads`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mqa.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameter name -> the mesh axis of each dimension (blocks carry a leading layer axis).
RULES = {
    "embed": ("fsdp", None),                        # [vocab, m]
    "unembed": ("fsdp", None),                      # [m, vocab]
    "q": (None, "fsdp", "tensor", None),            # [layers, m, heads, d]
    "k": (None, "fsdp", "tensor", None),            # [layers, m, kv_heads, d]
    "v": (None, "fsdp", "tensor", None),
    "out": (None, "tensor", None, "fsdp"),          # [layers, heads, d, m]
    "kv": (None, "fsdp", "tensor", None),           # tied: [layers, m, kv_heads, d]
    "k_rope": (None, "fsdp", None),                 # tied, latent: [layers, m, rope dims]
    "q_rope": (None, "fsdp", "tensor", None),       # latent: [layers, m or q latent, heads, r]
    "q_down": (None, "fsdp", None),                 # latent: [layers, m, q latent]
    "kv_down": (None, "fsdp", None),                # latent: [layers, m, latent]
    "k_up": (None, "fsdp", "tensor", None),         # latent: [layers, latent, heads, n]
    "v_up": (None, "fsdp", "tensor", None),
    "gate": (None, "fsdp", "tensor"),               # [layers, m, mlp]
    "up": (None, "fsdp", "tensor"),
    "down": (None, "tensor", "fsdp"),               # [layers, mlp, m]
}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 in `mesh.{data, fsdp, tensor}` and checks the product is the device count."""
    sizes = [mesh_config[axis] for axis in AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(AXES, sizes))}: the fixed axes ({known} devices) "
                              f"do not divide the {num_devices} devices available")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                          f"{math.prod(sizes)} devices, but {num_devices} are available; "
                          "set one axis to -1 to fill them")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over all devices (of every host)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec for a parameter called `name`, replicating what does not divide."""
    axes = RULES.get(name, ())
    if len(axes) != len(shape):
        return P()
    return P(*(axis if axis and size % mesh.shape[axis] == 0 else None
               for axis, size in zip(axes, shape)))


def tree_shardings(tree, mesh: Mesh):
    """`NamedSharding`s for a pytree holding parameters: the parameters themselves, or a
    whole train state, whose optimizer moments carry the parameters' names and so follow
    the same rules. Leaves without a rule (step counters, norm scales) are replicated."""
    def sharding(path, leaf):
        name = next((k.key for k in reversed(path) if hasattr(k, "key")), "")
        return NamedSharding(mesh, spec_for(str(name), leaf.shape, mesh))
    return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: rows split over data x fsdp, sequence replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
