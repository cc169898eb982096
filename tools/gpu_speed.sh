#!/usr/bin/env bash
# Speed measurements of BENCHMARKS.md on one GPU of the device tool, one mode per call.
#
# Here, once (repo root): the official code and the one wheel the GPU image lacks,
# into folders .git/info/exclude keeps out of git:
#     mkdir -p .official && git -C <mirror of Ma-Lab-Berkeley/CRATE> archive HEAD model | tar -x -C .official
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml-collections==1.1.0
#     # tokamax (the GPU LayerNorm 'auto' picks) and the needs the GPU image lacks:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl tokamax==0.0.12 einshape qwix pydantic pydantic-core \
#       annotated-types typing-inspection typeguard==2.13.3 immutabledict tensorboardx typing_extensions
#     # the official module's imports, for the export's strict-load test (carry .whl_timm too):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl_timm timm einops huggingface_hub safetensors pyyaml tqdm
#     # the previous kernel and layers, for `verify` (before/after a kernel change):
#     mkdir -p .oldkernel && git show 1fd5e5c:crate_mae_jax/kernels/mssa.py > .oldkernel/mssa_old.py \
#       && git show 1fd5e5c:crate_mae_jax/models/layers.py > .oldkernel/layers_old.py
# Then, through the device tool (carry .official and .whl; .oldkernel for verify):
#     bash tools/gpu_speed.sh defaults   # the Base defaults vs the official code (+SDPA), profile
#     bash tools/gpu_speed.sh table      # `main` on in-memory data, then tiny/small/base/large
#     bash tools/gpu_speed.sh remat      # remat policies of Base, ViT-MAE-Base
#     bash tools/gpu_speed.sh mssa       # our MSSA kernel in the step vs the default and PyTorch
#     bash tools/gpu_speed.sh gputests   # the GPU-only tests: attention paths, the MSSA kernel
#     bash tools/gpu_speed.sh table2     # the rest of the table: ViT-MAE-Base, remat of Base
#     bash tools/gpu_speed.sh kernels    # LayerNorm / attention kernel candidates: micro + full step
#     bash tools/gpu_speed.sh layernorm  # our LayerNorm kernel: GPU tests, micro sweep, whole step
#     bash tools/gpu_speed.sh final      # the defaults beside PyTorch, then `main` on in-memory data
#     bash tools/gpu_speed.sh verify     # a kernel change vs .oldkernel: GPU tests, micro, step
#     bash tools/gpu_speed.sh decide     # all in one call (DEADLINE s): a kernel change vs
#         .oldkernel/mssa_main.py (`git show HEAD:crate_mae_jax/kernels/mssa.py`), GPU tests,
#         step both ways, keep the faster, PyTorch comparators, profile while time is left
#     bash tools/gpu_speed.sh side       # the kernels' GPU tests, then the defaults beside PyTorch
#                                        # (tokamax and its needs as wheels in .whl, see BENCHMARKS.md)
# Everything lands in $OUT (JSON + log); the tables print last.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() { timeout "${T:-300}" python3 -m crate_mae_jax.tools.benchmark "$@"; }
# The real loop: `main` with configs/base.py on in-memory synthetic 224 px data (device
# augmentation), STEPS steps within TIMEOUT seconds; log in $OUT/main_base.log.
main_loop() {
  python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(0)
np.savez("/tmp/synthetic224.npz",
         train_images=rng.integers(0, 256, (2048, 224, 224, 3), dtype=np.uint8),
         train_labels=np.zeros(2048, np.int64),
         test_images=rng.integers(0, 256, (256, 224, 224, 3), dtype=np.uint8),
         test_labels=np.zeros(256, np.int64))
PY
  timeout "$2" python3 -m crate_mae_jax.main --config=configs/base.py --workdir=/tmp/main_base \
    --config.data.source=arrays --config.data.path=/tmp/synthetic224.npz \
    --config.data.in_memory=True --config.batch_size=256 --config.num_train_steps="$1" \
    --config.log_every_steps=50 --config.eval_every_steps=100000 \
    --config.checkpoint_every_steps=100000 --config.eval.max_batches=1 \
    > "$OUT/main_base.log" 2>&1; echo "main exit $?"
  grep -E "steps/s|error|Error" "$OUT/main_base.log" | tail -8
}
case "${1:-}" in
  defaults)
    # 1. What a user gets: no flags at all (attention and LayerNorm 'auto', XLA GPU
    #    defaults; tokamax carried as a wheel, as `pip install crate-mae-jax[gpu]` gives).
    bench --variant base --batch_size 256 --json "$OUT/jax_base_default.json" | tail -3
    # 2. The official code, torch.compile, with and without PyTorch's fused SDPA.
    T=300 timeout 300 python3 tools/bench_official_torch.py --official_dir .official \
      --modes compile,sdpa_compile --batch_size 256 --json "$OUT/torch_256.json"
    # 3. The previous default (flax LayerNorm, i.e. without tokamax) beside it.
    bench --variant base --batch_size 256 --norm_impl flax --label flax-layernorm \
      --json "$OUT/jax_base_flax_ln.json" | tail -3
    # 4. Where the time goes now.
    bench --variant base --batch_size 256 --profile /tmp/prof --json "$OUT/jax_base_profile.json" \
      | tail -45
    ;;
  mssa)
    # Our MSSA kernel in the whole step, beside the default (cuDNN), and the official
    # code (+SDPA) in the same call; then the profile of the kernel's step.
    JAX_PLATFORMS=cuda timeout 120 python3 -m pytest tests/test_kernel_mssa.py -q -rs 2>&1 | tail -4
    bench --variant base --batch_size 256 --attention_impl auto,mssa --json "$OUT/jax_base_mssa.json" | tail -4
    T=300 timeout 300 python3 tools/bench_official_torch.py --official_dir .official \
      --modes compile,sdpa_compile --batch_size 256 --json "$OUT/torch_256.json"
    bench --variant base --batch_size 256 --attention_impl mssa --profile /tmp/prof \
      --json "$OUT/jax_base_mssa_profile.json" | tail -45
    ;;
  kernels)
    # Each candidate at CRATE-MAE-Base's shapes (fwd + bwd, gradient error against
    # the first), then the whole train step with each LayerNorm path.
    bench --micro --variant base --batch_size 256 --json "$OUT/micro_base.json" | grep -v "^{" | tail -3
    T=400 bench --variant base --batch_size 256 --norm_impl flax,tokamax,pallas \
      --json "$OUT/jax_base_norms.json" | tail -6
    ;;
  layernorm)
    # Our LayerNorm kernel (plain and with the residual add fused): its GPU tests, the
    # micro sweep against flax and tokamax, then the whole Base step with each LayerNorm.
    JAX_PLATFORMS=cuda timeout 150 python3 -m pytest tests/test_kernel_layernorm.py \
      tests/test_attention_paths.py -k "gpu or pad_once" -q -rs -p no:cacheprovider 2>&1 | tail -8
    timeout 150 python3 tools/bench_layernorm_kernel.py --json "$OUT/bench_ln.json" 2>&1 | grep -v "^ "
    T=200 bench --variant base --batch_size 256 --norm_impl tokamax,pallas \
      --json "$OUT/jax_base_norms.json" | tail -5
    T=90 bench --variant base --batch_size 256 --norm_impl pallas --profile /tmp/prof \
      --json "$OUT/jax_base_pallas_profile.json" | tail -40
    ;;
  side)
    # The GPU-only kernel tests (failures in full), then what a user gets by default
    # beside the official code (+SDPA) under torch.compile, in one call.
    JAX_PLATFORMS=cuda timeout 150 python3 -m pytest tests/test_kernel_layernorm.py \
      tests/test_attention_paths.py -k "gpu or pad_once" -q -rs --tb=line -p no:cacheprovider \
      2>&1 | grep -E "passed|failed|Error|assert" | head -20
    bench --variant base --batch_size 256 --json "$OUT/jax_base_default.json" | tail -3
    T=300 timeout 300 python3 tools/bench_official_torch.py --official_dir .official \
      --modes compile,sdpa_compile --batch_size 256 --json "$OUT/torch_256.json"
    ;;
  gputests)
    # The tests that only run on a GPU: attention paths and our MSSA kernel.
    JAX_PLATFORMS=cuda timeout 400 python3 -m pytest tests/test_attention_paths.py \
      tests/test_kernel_mssa.py -q -rs -p no:cacheprovider 2>&1 | tail -30
    ;;
  table)
    # In order of importance; each step has its own time limit (table2: the rest).
    main_loop 500 200
    T=330 bench --arch crate_mae --variant tiny,small,base,large --batch_size 256 \
      --steps 10 --windows 3 --warmup 2 --json "$OUT/jax_variants.json" | tail -6
    ;;
  table2)
    # The rest of the table: ViT-MAE-Base and the remat policies of Base.
    bench --arch vit_mae --variant base --batch_size 256 --isolate --steps 10 --windows 3 \
      --warmup 2 --json "$OUT/jax_vit.json" | tail -3
    T=200 bench --variant base --remat_policy full,dots_with_no_batch_dims_saveable \
      --batch_size 256 --steps 10 --windows 3 --warmup 2 --json "$OUT/jax_remat.json" | tail -3
    python3 -m crate_mae_jax.tools.benchmark --report="$(ls "$OUT"/jax_*.json | paste -sd,)"
    ;;
  remat)
    # Rematerialisation policies of Base, and ViT-MAE-Base, at batch 256.
    T=500 bench --variant base --batch_size 256 \
      --remat_policy none,full,dots_saveable,dots_with_no_batch_dims_saveable \
      --steps 10 --windows 3 --warmup 2 --json "$OUT/jax_remat.json" | tail -6
    bench --arch vit_mae --variant base --batch_size 256 --isolate --steps 10 --windows 3 \
      --warmup 2 --json "$OUT/jax_vit.json" | tail -3
    ;;
  final)
    # What a user gets, beside the strongest PyTorch, in one call: the defaults (no
    # flags), the official code and the official model with SDPA under torch.compile,
    # then the real `main` loop on in-memory data (configs/base.py, 300 steps).
    bench --variant base --batch_size 256 --json "$OUT/jax_base_default.json" | tail -3
    T=300 timeout 300 python3 tools/bench_official_torch.py --official_dir .official \
      --modes compile,sdpa_compile --batch_size 256 --json "$OUT/torch_256.json"
    main_loop 300 150
    ;;
  verify)
    # A kernel change against the previous files (.oldkernel/, see the header): its GPU
    # tests, the micro-benchmark against the previous kernel, the whole step both ways.
    # Made for benchmarks/pending/mssa_one_launch.patch (git apply it first).
    JAX_PLATFORMS=cuda timeout 60 python3 -m pytest tests/test_kernel_mssa.py -q -rs -x \
      --tb=short -p no:cacheprovider 2>&1 | tail -6
    timeout 75 python3 tools/bench_mssa_kernel.py --budget_s 50 --windows 5 --iters 30 \
      --baseline .oldkernel/mssa_old.py --only "kernel 197 (in-kernel mask),baseline 197,XLA 197" \
      --json "$OUT/bench_mssa.json" 2>&1 | grep -v "^ " | tail -8
    cp crate_mae_jax/kernels/mssa.py /tmp/mssa_new.py; cp crate_mae_jax/models/layers.py /tmp/layers_new.py
    cp .oldkernel/mssa_old.py crate_mae_jax/kernels/mssa.py; cp .oldkernel/layers_old.py crate_mae_jax/models/layers.py
    T=60 bench --variant base --batch_size 256 --windows 3 --label previous --json "$OUT/step_previous.json" | tail -2
    cp /tmp/mssa_new.py crate_mae_jax/kernels/mssa.py; cp /tmp/layers_new.py crate_mae_jax/models/layers.py
    T=60 bench --variant base --batch_size 256 --windows 3 --label new --json "$OUT/step_new.json" | tail -2
    ;;
  decide)
    # One call for a kernel change when device time is short: every step has a share of
    # DEADLINE seconds (default 560); SKIP_MICRO=1 and TORCH_MODES=sdpa_compile shorten it.
    left() { local l=$(( ${DEADLINE:-560} - SECONDS )); [ "$l" -gt "$1" ] && echo "$1" || echo $(( l > 5 ? l : 5 )); }
    echo "== GPU tests $SECONDS s"
    JAX_PLATFORMS=cuda timeout "$(left 70)" python3 -m pytest tests/test_kernel_mssa.py -q -rs -x \
      --tb=short -p no:cacheprovider 2>&1 | tail -6
    if [ -z "${SKIP_MICRO:-}" ]; then
      echo "== micro $SECONDS s"
      timeout "$(left 60)" python3 tools/bench_mssa_kernel.py --budget_s 35 --windows 5 --iters 30 \
        --baseline .oldkernel/mssa_main.py --only "kernel 197 (in-kernel mask),baseline 197,fwd-loop" \
        --json "$OUT/bench_mssa.json" 2>&1 | grep -v "^ " | tail -8
    fi
    cp crate_mae_jax/kernels/mssa.py /tmp/mssa_new.py
    cp .oldkernel/mssa_main.py crate_mae_jax/kernels/mssa.py
    echo "== step, main's kernel $SECONDS s"
    T="$(left 60)" bench --variant base --batch_size 256 \
      --windows 3 --label main --json "$OUT/step_main.json" | tail -2
    cp /tmp/mssa_new.py crate_mae_jax/kernels/mssa.py
    echo "== step, changed kernel $SECONDS s"
    T="$(left 60)" bench --variant base --batch_size 256 \
      --windows 3 --label changed --json "$OUT/step_new.json" | tail -2
    python3 - "$OUT" <<'PY'
import json, shutil, sys
o = sys.argv[1]
try:
  new = json.load(open(f"{o}/step_new.json"))["rows"][0]["ms_step"]
  old = json.load(open(f"{o}/step_main.json"))["rows"][0]["ms_step"]
except Exception as e:  # pylint: disable=broad-except
  new = old = None
  print("no step numbers:", e)
if new is None or new >= old:
  shutil.copy(".oldkernel/mssa_main.py", "crate_mae_jax/kernels/mssa.py")
print("kept:", "changed" if new is not None and new < old else "main's", new, "vs", old, "ms/step")
PY
    echo "== official PyTorch $SECONDS s"
    timeout "$(left 250)" python3 tools/bench_official_torch.py --official_dir .official \
      --modes "${TORCH_MODES:-sdpa_compile,compile}" --batch_size 256 --json "$OUT/torch_256.json"
    echo "== profile of the kept kernel $SECONDS s"
    T="$(left 120)" bench --variant base --batch_size 256 \
      --profile /tmp/prof --json "$OUT/step_profile.json" 2>&1 | tail -45
    ;;
  *) echo "usage: $0 defaults|side|mssa|gputests|table|table2|kernels|layernorm|remat|final|verify|decide"; exit 2 ;;
esac
