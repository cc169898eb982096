"""Device meshes and the mapping from logical axis names to mesh axes.

Parameters carry logical names (see `layers`); `config.mesh.rules` maps them onto
the axes of a mesh built from `config.mesh.shape`. Pure data parallelism, FSDP
and data × fsdp × tensor mixes are therefore config changes. JAX (GSPMD through
`jax.jit` with shardings) does the rest.

`activate(mesh, rules)` sets the mesh (`jax.set_mesh`) and the rules for tracing,
so the activation constraints of `models.layers.constrain` land in the compiled program.
"""
import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from crate_mae_jax.errors import ConfigError

# Mesh axes over which the batch is split (all that exist in the mesh).
BATCH_AXES = ("data", "fsdp")
# Logical names of activations (batch, tokens, width), and per head
# (batch, tokens, heads, head_dim): heads split over 'tensor'.
ACT = ("activation_batch", "activation_length", "activation_embed")
ACT_HEADS = ("activation_batch", "activation_length", "heads", "head_dim")


def mesh_shape(shape_cfg, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves a (name, size) list with at most one -1 against the device count."""
  names = tuple(name for name, _ in shape_cfg)
  sizes = [int(size) for _, size in shape_cfg]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh.shape {dict(zip(names, sizes))}: every axis size must be "
                     "positive, except at most one -1 (the remaining devices)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape: fixed axes multiply to {known}, which does not "
                       f"divide the {num_devices} devices; change the axis sizes")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh.shape {dict(zip(names, sizes))} needs "
                     f"{math.prod(sizes)} devices but {num_devices} are available; use -1 "
                     "for one axis to take the remaining devices")
  return names, tuple(sizes)


def parse_mesh(text: str, num_devices: int | None = None) -> tuple[tuple[str, int], ...]:
  """'data=8,fsdp=8' -> (('data', 8), ('fsdp', 8), ('tensor', 1)): unnamed axes get
  size 1, except `data`, which takes the remaining devices (-1) when no axis does;
  with `num_devices` the -1 is resolved and the product checked."""
  sizes = {}
  for part in filter(None, (t.strip() for t in text.split(","))):
    name, _, size = part.partition("=")
    if name not in ("data", "fsdp", "tensor") or not size.lstrip("-").isdigit():
      raise ConfigError(f"--mesh={text!r}: use axis=size pairs of data, fsdp, tensor, "
                        "e.g. --mesh=data=8,fsdp=8")
    sizes[name] = int(size)
  if "data" not in sizes and -1 not in sizes.values():
    sizes["data"] = -1
  shape = tuple((name, sizes.get(name, 1)) for name in ("data", "fsdp", "tensor"))
  if num_devices is None:
    return shape
  try:
    names, resolved = mesh_shape(shape, num_devices)
  except ValueError as e:
    raise ConfigError(f"--mesh={text!r}: {e}") from None
  return tuple(zip(names, resolved))


def create_mesh(shape_cfg, devices=None) -> Mesh:
  """A mesh laid out on the physical topology (`jax.make_mesh`), with automatic
  (GSPMD) axes: shardings come from jit and the constraints, not from types."""
  devices = jax.devices() if devices is None else devices
  names, sizes = mesh_shape(shape_cfg, len(devices))
  auto = (AxisType.Auto,) * len(names)
  try:
    return jax.make_mesh(sizes, names, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Device sets make_mesh cannot lay out (e.g. multi-slice): keep their order.
    return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=auto)


@contextlib.contextmanager
def activate(mesh: Mesh, logical_rules):
  """The mesh and logical rules under which steps are traced, lowered and run."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    yield


def rules(mesh_cfg) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_cfg.rules)


def fit_spec(spec: P, shape: tuple[int, ...], axis_sizes) -> P:
  """Drops mesh axes that do not divide a dimension (that dim is replicated).

  `axis_sizes` maps mesh axis names to sizes (`mesh.shape` of a concrete or an
  abstract mesh); axes of size 1 are dropped too, so specs stay readable.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    names = tuple(a for a in names if axis_sizes.get(a, 1) > 1)
    size = math.prod(axis_sizes[a] for a in names)
    fitted.append(None if not names or dim % size else (names if len(names) > 1 else names[0]))
  return P(*fitted)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, logical_rules) -> Any:
  """NamedShardings for a tree that may hold `nn.LogicallyPartitioned` boxes.

  Unboxed leaves are replicated. The result has the structure of the unboxed tree.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, logical_rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree_util.tree_map(
      lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh.shape)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from each process's local slice (multi-host)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in local.items()}


def mesh_spec(names: tuple[str | None, ...], shape: tuple[int, ...]
              ) -> jax.sharding.PartitionSpec | None:
  """The mesh placement of an array of `shape` with these logical names under
  the current mesh and rules (None outside a mesh or without rules); axes that
  do not divide a dimension leave it replicated."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None
  return fit_spec(nn.logical_to_mesh_axes(names, rules), shape, mesh.shape)
