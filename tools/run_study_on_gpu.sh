#!/usr/bin/env bash
# The Fashion-MNIST study of issue 8 (experiments.study) on one GPU of the
# workplace's device tool. Three steps; only the second runs on the GPU.
#
# 1. Here, in the repo root (no GPU):
#        bash tools/run_study_on_gpu.sh prepare
#    copies the Fashion-MNIST IDX files (Debian's dataset-fashion-mnist,
#    /usr/share/datasets/fashion-mnist, 30 MB) into .fmnist/, which
#    .git/info/exclude keeps out of git, and checks that .whl/ holds the one
#    wheel the GPU image lacks (ml_collections; absl-py, flax, jax, optax,
#    orbax-checkpoint, numpy and pillow are in the image; clu and TensorFlow are
#    not, and the study needs neither).
#
# 2. The device tool's `run`, exactly. One call runs everything (measured 9.1 min
#    of study on one H100, RESULTS.md: it fits the tool's 600 s, only just):
#        run(kind="nvidia-h100-x1", timeout_s=600, carry=[".fmnist", ".whl"],
#            command="bash tools/run_study_on_gpu.sh device")
#    Safer: two calls of about 4.5 min, one arch each, with step 3 after each
#    call into the same DIR:
#            command="STUDY_ARGS=--archs=crate_mae bash tools/run_study_on_gpu.sh device"
#            command="STUDY_ARGS='--archs=vit_mae --nopixel_floor' bash tools/run_study_on_gpu.sh device"
#    It installs the carried wheels, runs
#        python3 -m experiments.study --workdir=/tmp/study --data_path=.fmnist
#    and returns (under $OUT, at most 8 files): study.json, study.md,
#    loss_curves.png, study.log and study_files.tar.gz (the study folder without
#    checkpoints: per-arch summary.json, layerwise / reconstruction / attention /
#    pca figures, per-stage results.json, scalars.json, stage.json).
#    Environment knobs: STUDY_SCALE (default 1.0) multiplies every epoch count;
#    STUDY_ARGS adds flags of experiments.study; STUDY_TIMEOUT (default 580 s)
#    is the guard after which SIGTERM makes the study save the running stage
#    and write the report of what finished.
#
# 3. Here, with the folder the tool put the returned files in (its files_at):
#        bash tools/run_study_on_gpu.sh unpack FILES_AT [DIR]
#    extracts study_files.tar.gz into DIR (default workdirs/study_gpu) and
#    rebuilds study.json / study.md / loss_curves.png from everything DIR holds
#    (python -m experiments.study --workdir=DIR --report_only), merging split runs.
set -u
cd "$(dirname "$0")/.." || exit 1
mode="${1:-}"
FMNIST_SRC="${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}"

# On the device machine: the carried data and wheels, and the environment both modes use.
device_setup() {
  : "${OUT:?OUT is unset: this mode runs on the device machine}"
  [ -d .fmnist ] || { echo ".fmnist/ missing: run 'prepare' here and carry .fmnist"; exit 1; }
  # Recompiles of identical programs hit this cache instead of XLA.
  export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
  else
    export PYTHONPATH="$PWD"
  fi
  nvidia-smi -L
}

case "$mode" in
  prepare)
    exclude="$(git rev-parse --git-path info/exclude)"
    for pattern in /.fmnist/ /.whl/; do
      grep -qxF "$pattern" "$exclude" 2>/dev/null || echo "$pattern" >>"$exclude"
    done
    mkdir -p .fmnist
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
             t10k-labels-idx1-ubyte; do
      if [ -f "$FMNIST_SRC/$f.gz" ]; then cp -u "$FMNIST_SRC/$f.gz" .fmnist/
      elif [ -f "$FMNIST_SRC/$f" ]; then cp -u "$FMNIST_SRC/$f" .fmnist/
      else echo "missing ${FMNIST_SRC}/${f}[.gz] (apt install dataset-fashion-mnist)"; exit 1; fi
    done
    if ! ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
      "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 -d .whl ml-collections==1.1.0 || exit 1
    fi
    for d in .fmnist/ .whl/; do
      git check-ignore -q "$d" || { echo "$d is not ignored by git"; exit 1; }
    done
    du -sh .fmnist .whl
    echo "ready: run(kind=\"nvidia-h100-x1\", timeout_s=600, carry=[\".fmnist\", \".whl\"]," \
         "command=\"bash tools/run_study_on_gpu.sh device\")"
    ;;

  device)
    set -o pipefail
    device_setup
    study=/tmp/study
    start=$(date +%s)
    # A guard under the tool's 600 s (pip and tar take seconds): SIGTERM makes a
    # running stage save a checkpoint and the study write the report of what is
    # complete, so the files below still come back.
    # shellcheck disable=SC2086
    timeout -s TERM "${STUDY_TIMEOUT:-580}" python3 -m experiments.study --workdir="$study" \
      --data_path=.fmnist --scale="${STUDY_SCALE:-1.0}" ${STUDY_ARGS:-} 2>&1 \
      | tee "$OUT/study.log"
    rc=$?
    echo "study exit status $rc after $(( $(date +%s) - start )) s"
    for f in study.json study.md loss_curves.png; do
      [ -f "$study/$f" ] && cp "$study/$f" "$OUT/"
    done
    tar -C "$study" --exclude=checkpoints -czf "$OUT/study_files.tar.gz" .
    ls -la "$OUT"
    exit "$rc"
    ;;

  device2)
    # The study of experiments.study_v2 (baselines, layer-wise read-outs,
    # random-init controls, 3 seeds) in one call of the device tool:
    #     run(kind="nvidia-h100-x1", timeout_s=600, carry=[".fmnist", ".whl"],
    #         command="bash tools/run_study_on_gpu.sh device2")
    # STUDY2_WORKERS (default 6) processes share the GPU; a worker starts no run
    # expected to end after STUDY2_DEADLINE (default 490 s); STUDY2_TIMEOUT (default
    # 540 s) sends SIGTERM (a running stage saves and stops; KILL 15 s later), then the
    # tar and the report of what finished (<= 25 s); STUDY2_ARGS adds flags (e.g. --pretrain_epochs=30).
    # Returns (under $OUT): study2.json, study2.md, answers.md, layerwise_readout.png,
    # white_box.png, study2.log, study2_files.tar.gz (runs/*/results.json, stage
    # scalars, worker logs; no checkpoints).
    set -o pipefail
    device_setup
    study=/tmp/study2
    start=$(date +%s)
    # shellcheck disable=SC2086
    timeout -k 15 -s TERM "${STUDY2_TIMEOUT:-540}" python3 -m experiments.study_v2 \
      --workdir="$study" --data_path=.fmnist --workers="${STUDY2_WORKERS:-6}" \
      --deadline_s="${STUDY2_DEADLINE:-490}" ${STUDY2_ARGS:-} 2>&1 | tee "$OUT/study2.log"
    rc=$?
    echo "study exit status $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/study2.log"
    tar -C "$study" --exclude=checkpoints --exclude=claims -czf "$OUT/study2_files.tar.gz" .
    JAX_PLATFORMS=cpu timeout 25 python3 -m experiments.study_v2 --workdir="$study" --report_only \
      --docs="$OUT" >/dev/null 2>>"$OUT/study2.log"
    ls -la "$OUT"
    exit "$rc"
    ;;

  unpack2)
    files="${2:?usage: $0 unpack2 FILES_AT [RUNS_DIR] [DOCS_DIR]}"
    dir="${3:-workdirs/study2_gpu}"
    docs="${4:-docs/study_fashion_mnist_v2}"
    mkdir -p "$dir" "$docs"
    tar -xzf "$files/study2_files.tar.gz" -C "$dir" || exit 1
    cp "$files/study2.log" "$docs/study2.log" 2>/dev/null
    PYTHON="${PYTHON:-python3}"
    JAX_PLATFORMS=cpu "$PYTHON" -m experiments.study_v2 --workdir="$dir" \
      --report_only --docs="$docs"
    ;;

  unpack)
    files="${2:?usage: $0 unpack FILES_AT [DIR]}"
    dir="${3:-workdirs/study_gpu}"
    mkdir -p "$dir"
    tar -xzf "$files/study_files.tar.gz" -C "$dir" || exit 1
    cp "$files/study.log" "$dir/study_$(date +%Y%m%d_%H%M%S).log" 2>/dev/null
    PYTHON="${PYTHON:-python3}"
    JAX_PLATFORMS=cpu "$PYTHON" -m experiments.study --workdir="$dir" --report_only
    ;;

  *)
    sed -n '2,40p' "$0"
    echo "also: device2 / unpack2 FILES_AT [RUNS_DIR] [DOCS_DIR] (experiments.study_v2)"
    exit 2
    ;;
esac
