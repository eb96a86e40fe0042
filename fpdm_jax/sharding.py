"""Device meshes and where arrays live on them.

A mesh is described in the config as ordered ``(axis, size)`` pairs, e.g.
``(("data", -1), ("fsdp", 2))``; ``-1`` takes the devices left over. Batches
are split along every batch axis (``data`` and ``fsdp``: FSDP shards
parameters across ``fsdp`` but every device still sees its own examples).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[tuple[str, int]] | Mapping[str, int] = (("data", -1), ("fsdp", 1)),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over all (or the given) devices; one axis may be -1."""
  axes = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
  devices = list(devices if devices is not None else jax.devices())
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {axes}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {axes}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise ValueError(f"mesh {axes} needs {math.prod(sizes)} devices, there are {len(devices)}")
  if math.prod(sizes) < len(devices):
    logging.warning("mesh %s uses %d of the %d devices", axes, math.prod(sizes), len(devices))
    devices = devices[:math.prod(sizes)]
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # odd shapes on CPU: fall back to the given order
    device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, names)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process batches into global arrays sharded over the batch axes.

  Each process passes its own rows; the global batch is their concatenation
  in process order (what ``jax.make_array_from_process_local_data`` does).
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in local.items()}


def to_host(tree):
  """Global arrays -> numpy, whole, on every process.

  ``np.asarray`` only works on arrays this process holds entirely; with
  several processes a batch-sharded output (or an FSDP-sharded parameter)
  has shards on other hosts, so those are all-gathered first.
  """
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)
