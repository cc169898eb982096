"""Command line entry point: parses flags and hands the config to `train`.

    python -m crate_mae_jax.main --config=configs/base.py --workdir=DIR \
        [--config.optim.base_lr=1e-4 ...]

Mistakes in the config or arguments are reported as one line naming the field
and the fix, with exit code 2, before anything is compiled.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and logs.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): 'auto' does so when the environment "
                  "shows several processes (Cloud TPU pods, SLURM, JAX_COORDINATOR_ADDRESS).")


def _multi_process_env() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
    return True
  if int(env.get("JAX_NUM_PROCESSES", "1")) > 1 or int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; settings go through --config.FIELD=VALUE")
  if FLAGS.workdir is None:
    _fail("--workdir is required (a local folder or gs:// path for checkpoints and logs)")
  if FLAGS.distributed == "on" or (FLAGS.distributed == "auto" and _multi_process_env()):
    import jax
    # Explicit settings (launch/gpu_cluster.sh) win; otherwise JAX detects
    # Cloud TPU and SLURM by itself.
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
  from crate_mae_jax import checkpoints, config_lib, summaries, train
  summaries.quiet_library_logs()
  config = FLAGS.config
  try:
    config_lib.validate(config)
    if not FLAGS.workdir.startswith("gs://"):
      os.makedirs(FLAGS.workdir, exist_ok=True)
      if not os.access(FLAGS.workdir, os.W_OK):
        _fail(f"--workdir {FLAGS.workdir!r} is not writable; pick a writable folder")
    results = train.train_and_evaluate(config, FLAGS.workdir)
  except (config_lib.ConfigError, checkpoints.CheckpointError) as e:
    _fail(str(e))
  except train.TrainingStopped as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  logging.info("final: %s", results)


def run():
  """Console-script entry point."""
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
