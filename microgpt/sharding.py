"""How the trainer lays the parameters and the optimizer state over the 'data' mesh axis.

    replicate   every device holds all of them; each computes the gradient of its rows of the
                batch, and the gradients are averaged (an all-reduce)
    fsdp        each array is split along one of its axes over the devices (ZeRO-3): inside the
                step a block's weights are all-gathered just before the block runs, and their
                gradients come back reduce-scattered to the shards (the all-gather's transpose),
                so the parameters, gradients and AdamW moments at rest take 1/N of a device each

The batch is split over 'data' either way, and the kernels run under shard_map on each device's
shapes. An array none of whose axes the device count divides stays whole on every device.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
SHARDINGS = ("replicate", "fsdp")


def spec(shape: tuple[int, ...], shard: str, num_devices: int) -> P:
    """fsdp: the array split along its longest axis that num_devices divides (the first of
    equals); replicate, or no such axis: whole on every device."""
    if shard not in SHARDINGS:
        raise ValueError(f"shard must be one of {SHARDINGS}; got {shard!r}")
    axes = [i for i, n in enumerate(shape) if n % num_devices == 0]
    if shard == "replicate" or num_devices == 1 or not axes:
        return P()
    split = max(axes, key=lambda i: shape[i])
    return P(*(AXIS if i == split else None for i in range(len(shape))))


def specs(tree, shard: str, num_devices: int):
    """The PartitionSpec of every array of a pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map(lambda a: spec(a.shape, shard, num_devices), tree)


def shardings(tree, shard: str, mesh: Mesh):
    """The NamedSharding of every array of a pytree on `mesh`."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s),
                                  specs(tree, shard, mesh.size),
                                  is_leaf=lambda s: isinstance(s, P))


class Shard(NamedTuple):
    """Inside shard_map: this device's part of an array, and the spec it was split by."""
    part: jax.Array
    spec: P

    def whole(self) -> jax.Array:
        """The array all-gathered along its split axis (its transpose, in the backward,
        reduce-scatters the gradient); the part itself when it is held whole."""
        for axis, name in enumerate(self.spec):
            if name == AXIS:
                return jax.lax.all_gather(self.part, AXIS, axis=axis, tiled=True)
        return self.part


def held(tree, tree_specs):
    """Each array of a pytree of this device's parts as a Shard of its spec."""
    return jax.tree_util.tree_map(Shard, tree, tree_specs)


def gather(tree):
    """A pytree of Shards -> its arrays whole (model.loss_fn's `gather`)."""
    return jax.tree_util.tree_map(Shard.whole, tree, is_leaf=lambda x: isinstance(x, Shard))


def bytes_per_device(tree) -> int:
    """The bytes of a pytree's arrays that the first device holds."""
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)
