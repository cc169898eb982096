"""RSS over the soak of tests/test_memory.py, as a script (BENCHMARKS.md, "Resident memory").

    JAX_PLATFORMS=cpu python tools/rss_soak.py MODE STEPS OUT.json

MODE: none (as shipped), arena2 (mallopt(M_ARENA_MAX, 2) before JAX starts), trim
(malloc_trim(0) every 5 steps). Prints and writes the RSS change from step 500 to the end
(median of the first and last 8 samples, one every 25 steps). The numbers in BENCHMARKS.md
were measured at commit 8ee296a, before every save trimmed by itself
(training/native_memory.py): there 'none' is the run as shipped before.
"""
import ctypes, json, os, sys, time, statistics, tempfile
mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL("libc.so.6")
if mode in ("arena2", "both"):
  assert libc.mallopt(-8, 2) == 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
from conftest import tiny_train_config
from crate_mae_jax.training import train
def rss():
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
      return int(line.split()[1])
every = 5
config = tiny_train_config("pretrain", source="quickstart", num_train_steps=steps,
                           checkpoint_every_steps=every, log_every_steps=50,
                           eval_every_steps=10**6, keep_checkpoints=2)
config.eval.diagnostics = False
samples = {}
def hook(step):
  if mode in ("trim", "both") and step % every == 0:
    libc.malloc_trim(0)
  if step % 25 == 0:
    samples[step] = rss()
t0 = time.time()
with tempfile.TemporaryDirectory() as d:
  train.train_and_evaluate(config, d, hooks=[hook])
window = [s for s in sorted(samples) if s >= 500]
start = statistics.median(samples[s] for s in window[:8])
end = statistics.median(samples[s] for s in window[-8:])
res = dict(mode=mode, steps=steps, secs=time.time() - t0, delta_kib=end - start, start_kib=start,
           end_kib=end, trace={s: samples[s] for s in window[::4]})
json.dump(res, open(out, "w"))
print(json.dumps({k: v for k, v in res.items() if k != "trace"}))
