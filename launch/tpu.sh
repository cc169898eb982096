#!/usr/bin/env bash
# Run crate-mae-jax on a Cloud TPU VM or pod slice from a workstation with gcloud.
# launch/tpu.sh COMMAND --help for each command; launch/README.md for examples.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Every flag can also come from the environment.
: "${TPU_NAME:=}" "${ZONE:=}" "${PROJECT:=}" "${ACCELERATOR_TYPE:=}" "${RUNTIME_VERSION:=}"
: "${QUEUED:=0}" "${SPOT:=0}" "${GIT_URL:=}" "${GIT_REF:=}" "${TARBALL:=}" "${EXTRAS:=tf,tpu}"
: "${CONFIG:=configs/base.py}" "${WORKDIR:=}" "${DATA_DIR:=}" "${WORKER:=}"
: "${TOPOLOGY:=}" "${MESH:=}" "${PYTHON:=python3}"

COMMON="--name=TPU_NAME --zone=ZONE --project=PROJECT"
LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html
# On each worker, relative to the home directory (where gcloud's ssh commands start).
REPO=crate-mae-jax
LOG=crate-mae-train.log
PID=crate-mae-train.pid

usage() {
  case ${CMD:-} in
    plan) cat <<EOF
Usage: $0 plan --topology TOPOLOGY [--config FILE] [--mesh data=N,fsdp=M] [--json OUT] [--config.FIELD=VALUE ...]
On this machine (no TPU, no gcloud): compile the train step for the slice with
libtpu (pip install -e '.[tpu]') and print per-chip memory, collectives and
XLA's step-time estimate; recommends a mesh. Exit 1 if nothing fits.
  --topology T   TOPOLOGY  e.g. v4:2x2x4 (v4-32), v5p:2x4x4 (v5p-64), v5e:16x16
                           (v5litepod-256), v6e:4x4 (v6e-16)
  --config FILE  CONFIG    (default: configs/base.py)
  --mesh M       MESH      one layout instead of the candidates
  --json OUT               also write the report as JSON
  PYTHON                   the Python to run it with (default: python3)
EOF
    ;;
    create) cat <<EOF
Usage: $0 create --name NAME --zone ZONE --accelerator-type TYPE [--topology T [--config FILE] [--mesh M]] [--runtime-version V] [--queued] [--spot]
Create a TPU VM, or with --queued a queued resource whose node is also called NAME.
With --topology the planner (see plan) runs here first, and nothing is created
unless the config fits the slice.
  --accelerator-type TYPE  ACCELERATOR_TYPE  e.g. v4-32, v5litepod-8, v5p-8, v6e-8 (required)
  --topology T             TOPOLOGY          plan for this topology before paying for it
  --runtime-version V      RUNTIME_VERSION   default: tpu-ubuntu2204-base (v2-v4),
                                             v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                                             v2-alpha-tpuv6e (v6e)
  --queued                 QUEUED=1          a queued resource instead of a TPU VM
  --spot                   SPOT=1            spot capacity: cheaper, can be preempted
EOF
    ;;
    setup) cat <<EOF
Usage: $0 setup --name NAME --zone ZONE (--git-url URL [--git-ref REF] | --tarball FILE) [--extras LIST]
On every worker, replace ~/$REPO with the package and pip install -e '.[EXTRAS]'
(jax[tpu] from the libtpu releases index).
  --git-url URL   GIT_URL  clone this repository
  --git-ref REF   GIT_REF  branch, tag or commit to check out (default: the default branch)
  --tarball FILE  TARBALL  or copy this tarball of the repository (setup.py at its top),
                           e.g. from: git archive -o crate-mae-jax.tar.gz HEAD
  --extras LIST   EXTRAS   pip extras (default: tf,tpu)
EOF
    ;;
    train) cat <<EOF
Usage: $0 train --name NAME --zone ZONE --workdir gs://... [--config FILE] [--data_dir DIR] [--config.FIELD=VALUE ...] [-- ARGS...]
Start python3 -m crate_mae_jax.main in ~/$REPO on every worker, in the background
(nohup); each worker logs to ~/$LOG. Refuses while a run started here is alive.
  --config FILE    CONFIG    relative to the repository (default: configs/base.py)
  --workdir URL    WORKDIR   gs:// directory for checkpoints and summaries (required)
  --data_dir DIR   DATA_DIR  TFDS data dir, e.g. gs://bucket/tfds (--config.data.data_dir)
  --config.FIELD=VALUE and everything after -- are passed through.
EOF
    ;;
    logs) cat <<EOF
Usage: $0 logs --name NAME --zone ZONE [--worker N]
Follow ~/$LOG on one worker (Ctrl-C to stop following).
  --worker N  WORKER  (default: 0)
EOF
    ;;
    stop) cat <<EOF
Usage: $0 stop --name NAME --zone ZONE
Stop the training process that train started, on every worker.
EOF
    ;;
    delete) cat <<EOF
Usage: $0 delete --name NAME --zone ZONE [--queued]
Delete the TPU VM, or with --queued the queued resource and its TPU.
  --queued  QUEUED=1
EOF
    ;;
    ssh) cat <<EOF
Usage: $0 ssh --name NAME --zone ZONE [--worker all|N] [--] COMMAND...
Run a shell command on every worker (or one).
  --worker all|N  WORKER  (default: all)
EOF
    ;;
    *) cat <<EOF
Usage: $0 COMMAND [FLAGS]   ($0 COMMAND --help for its flags)
Run crate-mae-jax on a Cloud TPU VM or pod slice.
  plan    compile for a topology here; per-chip memory and speed (before create)
  create  create the TPU VM (--queued: a queued resource)
  setup   install crate-mae-jax on every worker
  train   start training on every worker, in the background
  logs    follow a worker's training log
  stop    stop training on every worker
  delete  delete the TPU VM (--queued: the queued resource)
  ssh     run a command on every worker
EOF
    ;;
  esac
  cat <<EOF
Flags of every command (or environment variable):
  --name NAME        TPU_NAME   TPU VM / queued resource (required)
  --zone ZONE        ZONE       e.g. us-central2-b (required)
  --project PROJECT  PROJECT    default: gcloud's configured project
  --dry-run          DRY_RUN=1  print the gcloud commands instead of running them
EOF
}

# gcloud compute tpus ARGS... in this zone and project.
tpus() { run gcloud compute tpus "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}; }

# on_workers WORKER SCRIPT: run SCRIPT with the login shell of the worker(s).
on_workers() { tpus tpu-vm ssh "$TPU_NAME" --worker="$1" --command "$2"; }

require_tpu() { require TPU_NAME --name; require ZONE --zone; }

# The pod planner, run on this machine; exits 1 when the config fits no mesh.
planner() {
  run "$PYTHON" -m crate_mae_jax.tools.plan --config="$CONFIG" --topology="$TOPOLOGY" \
    ${MESH:+"--mesh=$MESH"} "$@"
}

cmd_plan() {
  local json=
  parse_flags "--config=CONFIG --topology=TOPOLOGY --mesh=MESH --json=json" "$@"
  require TOPOLOGY --topology
  planner ${json:+"--json=$json"} "${REST[@]}"
}

cmd_create() {
  parse_flags "$COMMON --accelerator-type=ACCELERATOR_TYPE --runtime-version=RUNTIME_VERSION --queued:QUEUED --spot:SPOT --topology=TOPOLOGY --config=CONFIG --mesh=MESH" "$@"
  require_tpu
  require ACCELERATOR_TYPE --accelerator-type
  if [[ -n $TOPOLOGY ]]; then
    planner "${REST[@]}" || usage_error "the planner says $CONFIG does not fit $TOPOLOGY: nothing created"
  else
    no_rest
  fi
  if [[ -z $RUNTIME_VERSION ]]; then
    case $ACCELERATOR_TYPE in
      v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) usage_error "no default runtime for --accelerator-type=$ACCELERATOR_TYPE; pass --runtime-version" ;;
    esac
  fi
  local spot=
  if [[ $SPOT == 1 ]]; then spot=--spot; fi
  if [[ $QUEUED == 1 ]]; then
    tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$RUNTIME_VERSION" ${spot:+"$spot"}
  else
    tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" ${spot:+"$spot"}
  fi
}

cmd_setup() {
  parse_flags "$COMMON --git-url=GIT_URL --git-ref=GIT_REF --tarball=TARBALL --extras=EXTRAS" "$@"
  no_rest
  require_tpu
  local fetch
  if [[ -n $TARBALL ]]; then
    [[ -z $GIT_URL ]] || usage_error "give --git-url or --tarball, not both"
    [[ -f $TARBALL ]] || usage_error "--tarball $TARBALL: no such file"
    tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REPO.tar.gz" --worker=all
    fetch="rm -rf $REPO && mkdir $REPO && tar -xf $REPO.tar.gz -C $REPO"
  else
    [[ -n $GIT_URL ]] || usage_error "missing --git-url or --tarball (or set GIT_URL or TARBALL)"
    fetch="rm -rf $REPO && git clone -q $(quote "$GIT_URL") $REPO"
    [[ -z $GIT_REF ]] || fetch+=" && git -C $REPO checkout -q $(quote "$GIT_REF")"
  fi
  on_workers all "$fetch && cd $REPO && python3 -m pip install -q -U pip \
&& python3 -m pip install -q -e $(quote ".[$EXTRAS]") -f $LIBTPU_INDEX"
}

cmd_train() {
  parse_flags "$COMMON --config=CONFIG --workdir=WORKDIR --data_dir=DATA_DIR --data-dir=DATA_DIR" "$@"
  require_tpu
  require WORKDIR --workdir
  [[ $WORKDIR == gs://* ]] || usage_error "--workdir must be a gs:// URL that every worker can write"
  local args=(--config="$CONFIG" --workdir="$WORKDIR")
  [[ -z $DATA_DIR ]] || args+=(--config.data.data_dir="$DATA_DIR")
  # The subshell execs nohup, which execs python: $! is the training process.
  on_workers all "if xargs kill -0 2>/dev/null < $PID; then echo \"\$(hostname): training is running; stop it first\" >&2; exit 1; fi; \
(cd $REPO && exec nohup python3 -m crate_mae_jax.main $(quote_all "${args[@]}" "${REST[@]}")) > $LOG 2>&1 < /dev/null & echo \$! > $PID"
}

cmd_logs() {
  parse_flags "$COMMON --worker=WORKER" "$@"
  no_rest
  require_tpu
  on_workers "${WORKER:-0}" "tail -n 200 -F $LOG"
}

cmd_stop() {
  parse_flags "$COMMON" "$@"
  no_rest
  require_tpu
  on_workers all "if [ -f $PID ]; then xargs kill < $PID || true; rm -f $PID; fi"
}

cmd_delete() {
  parse_flags "$COMMON --queued:QUEUED" "$@"
  no_rest
  require_tpu
  if [[ $QUEUED == 1 ]]; then
    tpus queued-resources delete "$TPU_NAME" --force
  else
    tpus tpu-vm delete "$TPU_NAME"
  fi
}

cmd_ssh() {
  parse_flags "$COMMON --worker=WORKER" "$@"
  require_tpu
  ((${#REST[@]})) || usage_error "missing the command to run (after --)"
  on_workers "${WORKER:-all}" "${REST[*]}"
}

CMD=${1:-}
case $CMD in
  plan | create | setup | train | logs | stop | delete | ssh) shift; "cmd_$CMD" "$@" ;;
  -h | --help | help) usage ;;
  '') usage >&2; exit 2 ;;
  *) usage_error "unknown command '$CMD' (plan, create, setup, train, logs, stop, delete or ssh)" ;;
esac
