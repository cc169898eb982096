r"""Command line entry point: flags -> config -> `train.train_and_evaluate`.

    python -m crate_mae_jax.main --config=configs/base.py --workdir=DIR \
        [--config.optim.base_lr=1e-4 ...]
    crate-mae-train --config=base --workdir=DIR        # installed: configs ship with it

Every mistake (flags, config, data, workdir) is one line `error: ...` and exit 2
before anything compiles; a run that has to stop is one line and exit 1 with its
last complete checkpoint kept; SIGTERM saves and exits 0, Ctrl-C 130, a closed
terminal 129 (see `errors`).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from crate_mae_jax import cli, errors, supervisor

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file: configs/NAME.py[:ARG], or just "
                                "NAME[:ARG] for one shipped with the package (base, "
                                "quickstart, finetune:cifar10,base, ...).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and logs.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): 'auto' does so when the environment "
                  "shows several processes (Cloud TPU pods, SLURM, JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("peer_timeout", 100,
                     "Several processes: seconds without heartbeats after which JAX's "
                     "coordination service counts a process as lost and ends the others "
                     "(each with one line naming it and the last checkpoint).")
flags.DEFINE_string("compilation_cache", None,
                    "Folder of JAX's persistent compilation cache, or 'off' (default: "
                    "$CRATE_MAE_JAX_COMPILATION_CACHE, $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/crate_mae_jax/jax_cache), so that restarts do not recompile.")


def _parse_flags(argv):
  argv = cli.rewrite_config_args(argv)
  if cli.wants_help(argv):
    from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
    cli.print_help(argv, FLAGS, config_lib.default_config(), module=__name__,
                   usage="--config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]")
    sys.exit(0)
  return errors.parse_flags(FLAGS, argv)


def _wants_distributed() -> bool:
  """Whether --distributed (or, with 'auto', the environment) asks for several processes."""
  env = os.environ
  several = (bool(env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"))
             or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
             or int(env.get("SLURM_NTASKS", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  return FLAGS.distributed == "on" or (FLAGS.distributed == "auto" and several)


def _initialize_distributed() -> None:
  """jax.distributed.initialize(), in a child process that `supervisor` watches: when
  the job loses a process, JAX's coordination service aborts this one from C++, and
  the watching parent ends the run with our one line."""
  if FLAGS.peer_timeout < 1:
    errors.fail(f"--peer_timeout={FLAGS.peer_timeout}: must be at least 1 second (JAX's "
                "default is 100)")
  workdir = FLAGS.workdir
  supervisor.supervise(lambda tail, signum: errors.ended_by_signal_message(
      supervisor.lost_member(tail), signum, workdir))
  env = os.environ
  import jax  # pylint: disable=import-outside-toplevel
  # Explicit settings (launch/gpu_cluster.sh) win; otherwise JAX detects Cloud TPU and SLURM.
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.peer_timeout, **kwargs)


def main(argv):
  if len(argv) > 1:
    errors.fail(f"unexpected arguments {argv[1:]}; settings go through --config.FIELD=VALUE")
  with errors.absl_errors_only():
    config = errors.loaded_config(FLAGS.config, sys.argv)
  if FLAGS.workdir is None:
    errors.fail("--workdir is required (a local folder or gs:// path for checkpoints and logs)")
  if _wants_distributed():
    _initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  from crate_mae_jax.training import (  # pylint: disable=import-outside-toplevel
      checkpoints, summaries, train, workdir_lock)
  summaries.quiet_library_logs()
  cli.enable_compilation_cache(FLAGS.compilation_cache)
  workdir = FLAGS.workdir
  try:
    resolved = config_lib.validate(config)
    config_lib.check_mesh(config, jax.device_count())
    errors.check_workdir(workdir)
    lock = workdir_lock.acquire(workdir, jax.process_index())  # held until exit
    results = train.train_and_evaluate(config, workdir, resolved=resolved)
  except (errors.ConfigError, checkpoints.CheckpointError, workdir_lock.WorkdirBusyError) as e:
    errors.exit_now(str(e), 2, threads_may_write=False)
  except (train.TrainingStopped, checkpoints.NonFiniteStateError,
          checkpoints.CheckpointFolderLost) as e:
    logging.error("%s", e)
    errors.exit_now(str(e), 1)
  except KeyboardInterrupt:
    errors.exit_now("interrupted (Ctrl-C) before training started; nothing was saved", 130)
  except Exception as e:  # pylint: disable=broad-except
    errors.exit_now(errors.failure_message(e, workdir), 1)
  if results.get("interrupted"):
    errors.exit_now(*errors.interrupted_message(results, workdir))
  del lock
  logging.info("final: %s", results)


def run():
  """Console-script entry point."""
  cli.quiet_startup()
  from crate_mae_jax.training import xla_defaults  # before JAX creates its backends
  xla_defaults.apply()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
