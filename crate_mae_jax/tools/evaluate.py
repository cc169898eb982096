"""Evaluators on any checkpoint, or on a randomly initialised model of a config.

    python -m crate_mae_jax.tools.evaluate --config=configs/quickstart.py --checkpoint=WORKDIR \\
        [--evals=knn,linear_probe,diagnostics] [--max_train=10000] [--output=evals.json]
    python -m crate_mae_jax.tools.evaluate --config=configs/quickstart.py --random_init

Runs the named evaluators (`crate_mae_jax.evaluators`; default: k-NN and the
ridge linear probe on every encoder layer, cls and mean-pooled, and, for
CRATE-MAE, coding rate and sparsity per layer) on the config's data, prints one
table per evaluator (a row per layer) and writes everything as JSON.
`--random_init` evaluates the model as `train_and_evaluate` would initialise it
(`config.seed`): the control that shows what pre-training added. A checkpoint of
another model size than the config's, or a missing one, exits with status 2 and
one line on stderr.
"""
import json
import os
import sys

from absl import app, flags
import jax
import ml_collections
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                lock_config=False)
flags.DEFINE_string("checkpoint", None, "Workdir or checkpoint directory of a run.")
flags.DEFINE_bool("random_init", False, "Evaluate the config's randomly initialised model.")
flags.DEFINE_list("evals", None, "Evaluator kinds (default: knn, linear_probe and, for "
                  "CRATE-MAE, diagnostics).")
flags.DEFINE_integer("max_train", 10_000, "Train images for k-NN / probes (0: all).")
flags.DEFINE_integer("max_test", 0, "Test images for k-NN / probes (0: all).")
flags.DEFINE_integer("k", 20, "k of the k-NN.")
flags.DEFINE_string("output", None, "JSON file (default: evals_<workdir>_step_<N>.json or "
                    "evals_random_init.json in the current directory, never inside the "
                    "checkpoint's workdir, which a live run may hold).")

LAYERED = ("knn", "linear_probe")


def default_kinds(config) -> list[str]:
  kinds = list(LAYERED)
  if config.model.arch == "crate_mae":
    kinds.append("diagnostics")
  return kinds


def random_params(config, resolved=None):
  """The parameters `train_and_evaluate` starts a pre-training run from;
  `resolved`: the config's ResolvedModel when the caller has it."""
  import optax
  from crate_mae_jax import sharding
  from crate_mae_jax.training import setup as setup_lib, state_lib
  cfg = config.copy_and_resolve_references()
  cfg.task = "pretrain"
  from crate_mae_jax import config_lib
  model = config_lib.resolve_model(cfg.model if resolved is None else resolved)
  mae, init_inputs, init_kwargs = setup_lib.build_model(cfg, model)
  mesh = sharding.create_mesh(config.mesh.shape)
  state, _ = state_lib.init_state(mae, optax.identity(), mesh, sharding.rules(config.mesh),
                                  init_inputs, init_kwargs, jax.random.key(config.seed))
  return jax.device_get(state.params)


def checkpoint_params(config, path: str, resolved=None):
  """(params, step) of the newest complete step (one being deleted by a live
  run's retention is passed over), checked against `config` before loading."""
  from crate_mae_jax import config_lib
  from crate_mae_jax.training import checkpoints, train
  params, _, step = checkpoints.read(
      path, check=lambda meta: train.check_against_checkpoint(
          config, meta, path, resolved or config_lib.resolve_model(config.model)))
  return params, step


def evaluate(config, params, kinds, *, max_train=None, max_test=None, k=20,
             resolved=None) -> dict:
  """{kind: results} of each evaluator on `params` (a MAE's or a classifier's)."""
  from crate_mae_jax import config_lib, evaluators, models
  from crate_mae_jax.data import input_pipeline
  cfg = config.copy_and_resolve_references()
  cfg.task = "pretrain"
  resolved = config_lib.resolve_model(cfg.model if resolved is None else resolved)
  source = input_pipeline.create(cfg.data, cfg.augment, task="pretrain", batch_size=256,
                                 seed=cfg.seed)
  fns = evaluators.predict_fns(models.build_mae(resolved), resolved, classifies=False)
  options = {"knn": dict(k=k, max_train=max_train, max_test=max_test),
             "linear_probe": dict(max_train=max_train, max_test=max_test)}
  out = {}
  for kind in kinds:
    if kind in ("diagnostics", "reconstruction") and "decoder" not in params:
      print(f"{kind}: skipped (the checkpoint holds no decoder)", file=sys.stderr)
      continue
    spec = ml_collections.ConfigDict({kind: dict(type=kind, **options.get(kind, {}))})
    cfg.evals = spec
    (entry,) = evaluators.from_config(cfg, resolved, fns, source=source)
    out[kind] = evaluators.scalars_only(entry.evaluator.run({"params": params}))
  return out


def layer_table(results: dict) -> str:
  """Rows: layers; columns: '<kind> <pool>' top-1 of the layered evaluators."""
  columns = [(kind, key.split("/")[0]) for kind in LAYERED if kind in results
             for key in results[kind] if key.endswith("/final")]
  if not columns:
    return ""
  layers = [key.split("/", 1)[1] for key in results[columns[0][0]]
            if key.startswith(columns[0][1] + "/") and not key.endswith("/best")]
  head = "| layer | " + " | ".join(f"{k} {p}" for k, p in columns) + " |"
  lines = [head, "|" + " --- |" * (len(columns) + 1)]
  for layer in layers:
    cells = [f"{100 * results[k][f'{p}/{layer}']:.1f}%" for k, p in columns]
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def diagnostics_table(values: dict) -> str:
  rows = sorted(values)
  return "\n".join(["| measure | value |", "| --- | ---: |"] +
                   [f"| {k} | {values[k]:.4g} |" for k in rows])


def default_output(checkpoint: str | None, tag: str) -> str:
  """evals_<name>_<tag>.json in the current directory: an evaluation is not
  written into the workdir of the run it reads (that run may hold it)."""
  if not checkpoint:
    return f"evals_{tag}.json"
  path = os.path.abspath(checkpoint).rstrip(os.sep)
  if os.path.basename(path) == "checkpoints":
    path = os.path.dirname(path)
  return f"evals_{os.path.basename(path) or 'checkpoint'}_{tag}.json"


def main(argv):
  from crate_mae_jax.training import checkpoints
  from crate_mae_jax import config_lib
  from crate_mae_jax.config_lib import ConfigError
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = FLAGS.config
  try:
    if config is None:
      raise ConfigError("--config is required (e.g. --config=configs/quickstart.py)")
    if bool(FLAGS.checkpoint) == bool(FLAGS.random_init):
      raise ConfigError("pass exactly one of --checkpoint=DIR and --random_init")
    resolved = config_lib.resolve_model(config.model)
    if FLAGS.random_init:
      params, tag = random_params(config, resolved), "random_init"
    else:
      params, step = checkpoint_params(config, FLAGS.checkpoint, resolved)
      tag = f"step_{step}"
    kinds = FLAGS.evals or default_kinds(config)
    results = evaluate(config, params, kinds, max_train=FLAGS.max_train or None,
                       max_test=FLAGS.max_test or None, k=FLAGS.k, resolved=resolved)
  except (ConfigError, checkpoints.CheckpointError, ValueError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)
  print(f"{'random initialisation' if FLAGS.random_init else FLAGS.checkpoint} ({tag}), "
        f"{config.data.source} {config.data.train_split} -> {config.data.eval_split}")
  table = layer_table(results)
  if table:
    print("top-1 per encoder layer ('final' = after the encoder's last norm):\n" + table)
  if "diagnostics" in results:
    print(diagnostics_table(results["diagnostics"]))
  output = FLAGS.output or default_output(FLAGS.checkpoint, tag)
  with open(output, "w") as f:
    json.dump(config_lib.redacted({"checkpoint": FLAGS.checkpoint,
                                   "random_init": FLAGS.random_init,
                                   "evals": kinds, "results": results}), f, indent=1)
  print(f"wrote {os.path.abspath(output)}")


def run():
  """Console-script entry point (crate-mae-eval)."""
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel
  cli.run_absl_app(main, FLAGS, module=__name__,
                   usage="--config=CONFIG (--checkpoint=DIR | --random_init) [--FLAG=VALUE ...]")


if __name__ == "__main__":
  run()
