"""The train state, created sharded, and jitting steps over a mesh (TF-free).

The state is laid out by the logical axis names of the parameters: `init_state`
traces the initialisers abstractly, derives NamedShardings for parameters and
optimizer state from `config.mesh.rules`, and then materialises every array
directly in its shard (nothing is built on one device first).
"""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from crate_mae_jax import sharding


def all_finite(tree) -> jax.Array:
  """Whether every floating leaf of `tree` is finite (a scalar bool array)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 (), optimizer updates done
  params: Any
  opt_state: Any
  batch_stats: Any              # BatchNorm statistics of a probe head ({} otherwise)
  rng: jax.Array                # uint32 key data; per-step keys are fold_in(rng, step)
  nonfinite_count: jax.Array    # int32 (), updates skipped for non-finite values
  first_nonfinite_step: jax.Array  # int32 (), -1 when none


def new_state(params, opt_state, rng_key, batch_stats=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    batch_stats={} if batch_stats is None else batch_stats,
                    rng=jax.random.key_data(rng_key),
                    nonfinite_count=jnp.zeros((), jnp.int32),
                    first_nonfinite_step=-jnp.ones((), jnp.int32))


def abstract_variables(model: nn.Module, init_inputs: tuple, init_kwargs: dict):
  """Boxed variable shapes (with logical names) of `model.init`."""
  def init(key):
    return model.init({"params": key, "masking": key, "dropout": key}, *init_inputs,
                      **init_kwargs)
  return jax.eval_shape(init, jax.random.key(0))


def state_shardings(model, tx, mesh: Mesh, logical_rules, init_inputs, init_kwargs):
  """(abstract unboxed TrainState, its NamedShardings)."""
  boxed = abstract_variables(model, init_inputs, init_kwargs)
  params_sh = sharding.logical_shardings(boxed["params"], mesh, logical_rules)
  # optax maps over the boxes, so the optimizer state inherits the logical names.
  opt_boxed = jax.eval_shape(tx.init, boxed["params"])
  opt_sh = sharding.logical_shardings(opt_boxed, mesh, logical_rules)
  stats = nn.meta.unbox(boxed.get("batch_stats", {}))
  abstract = jax.eval_shape(
      lambda p, o, s: new_state(p, o, jax.random.key(0), s),
      nn.meta.unbox(boxed["params"]), nn.meta.unbox(opt_boxed), stats)
  rep = sharding.replicated(mesh)
  shard = abstract.replace(
      step=rep, params=params_sh, opt_state=opt_sh,
      batch_stats=jax.tree_util.tree_map(lambda _: rep, stats), rng=rep,
      nonfinite_count=rep, first_nonfinite_step=rep)
  return abstract, shard


def init_state(model, tx, mesh: Mesh, logical_rules, init_inputs: tuple, init_kwargs: dict,
               key: jax.Array, params_override: Callable | None = None):
  """A fresh TrainState, sharded. `params_override(params) -> params` may replace
  parts of the initial parameters (e.g. a pre-trained encoder) before the
  optimizer state is made."""
  abstract, shard = state_shardings(model, tx, mesh, logical_rules, init_inputs, init_kwargs)
  init_key, state_key = jax.random.split(key)

  def make(k):
    variables = nn.meta.unbox(model.init({"params": k, "masking": k, "dropout": k},
                                         *init_inputs, **init_kwargs))
    return variables["params"], variables.get("batch_stats", {})

  with sharding.activate(mesh, logical_rules):
    params, stats = jax.jit(make, out_shardings=(shard.params, shard.batch_stats))(init_key)
    if params_override is not None:
      params = jax.device_put(params_override(params), shard.params)
    opt_state = jax.jit(tx.init, out_shardings=shard.opt_state)(params)
    state = jax.jit(lambda p, o, s: new_state(p, o, state_key, s),
                    out_shardings=shard)(params, opt_state, stats)
  return state, shard


def jit_train_step(step_fn: Callable, shard, mesh: Mesh, logical_rules) -> Callable:
  """Jits (state, batch) -> (state, metrics) with the state donated and kept in
  its shardings; the batch arrives already sharded over the batch axes."""
  jitted = jax.jit(step_fn, in_shardings=(shard, None),
                   out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))

  def run(state, batch):
    with sharding.activate(mesh, logical_rules):
      return jitted(state, batch)
  run.lower = lambda state, batch: _lower(jitted, mesh, logical_rules, state, batch)
  return run


def _lower(jitted, mesh, logical_rules, *args):
  with sharding.activate(mesh, logical_rules):
    return jitted.lower(*args)


def jit_eval_step(step_fn: Callable, variables_sharding, mesh: Mesh, logical_rules) -> Callable:
  """step_fn(variables, batch, index) jitted on the mesh: the process-local batch
  is assembled into the global one, the outputs come back replicated."""
  jitted = jax.jit(step_fn, in_shardings=(variables_sharding, None, None),
                   out_shardings=sharding.replicated(mesh))

  def run(variables, batch, index):
    with sharding.activate(mesh, logical_rules):
      return jitted(variables, sharding.global_batch(batch, mesh),
                    jnp.asarray(index, jnp.int32))
  return run
