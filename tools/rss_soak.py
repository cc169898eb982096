"""Resident memory over the soak of tests/test_memory.py, as a script (BENCHMARKS.md,
"Resident memory over a long run").

    JAX_PLATFORMS=cpu python tools/rss_soak.py --mode none --steps 1500 --json OUT.json

The tiny model trains for --steps with a checkpoint every 5 steps; the script prints and
writes the RSS change from step 500 to the end (median of the first and last 8 samples,
one every 25 steps). --mode: none (the package as it is), arena2 (glibc
mallopt(M_ARENA_MAX, 2) before JAX starts), trim (malloc_trim(0) every 5 steps on top).
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M_ARENA_MAX = -8
EVERY = 5


def rss_kib() -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--mode", choices=("none", "arena2", "trim"), default="none")
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--json", default="rss_soak.json")
  args = ap.parse_args()
  libc = ctypes.CDLL("libc.so.6")
  if args.mode == "arena2" and libc.mallopt(M_ARENA_MAX, 2) != 1:
    sys.exit("mallopt(M_ARENA_MAX, 2) failed")
  sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
  from conftest import tiny_train_config  # pylint: disable=import-outside-toplevel
  from crate_mae_jax.training import train  # pylint: disable=import-outside-toplevel
  config = tiny_train_config("pretrain", source="quickstart", num_train_steps=args.steps,
                             checkpoint_every_steps=EVERY, log_every_steps=50,
                             eval_every_steps=10**6, keep_checkpoints=2)
  config.eval.diagnostics = False
  samples = {}

  def hook(step):
    if args.mode == "trim" and step % EVERY == 0:
      libc.malloc_trim(0)
    if step % 25 == 0:
      samples[step] = rss_kib()

  t0 = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir, hooks=[hook])
  window = [s for s in sorted(samples) if s >= 500]
  start = statistics.median(samples[s] for s in window[:8])
  end = statistics.median(samples[s] for s in window[-8:])
  result = dict(mode=args.mode, steps=args.steps, secs=round(time.time() - t0, 1),
                delta_kib=end - start, start_kib=start, end_kib=end,
                trace={s: samples[s] for s in window[::4]})
  with open(args.json, "w") as f:
    json.dump(result, f)
  print(json.dumps({k: v for k, v in result.items() if k != "trace"}))


if __name__ == "__main__":
  main()
