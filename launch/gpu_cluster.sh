#!/usr/bin/env bash
# Start one crate-mae-jax training process of a multi-process GPU job with the
# jax.distributed environment set. Run it once per GPU (or once per node) on every
# node, e.g. with SLURM's srun. launch/README.md has a 2-node x 8-GPU example.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: srun $0 [FLAGS] -- TRAIN_ARGS...
       $0 --coordinator HOST:PORT --num-processes N --process-id I [FLAGS] -- TRAIN_ARGS...
Run python3 -m crate_mae_jax.main TRAIN_ARGS with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS set. Under SLURM they default to values from the
SLURM_* variables; flags (or those JAX_* variables already set) take precedence.
  --coordinator HOST:PORT  JAX_COORDINATOR_ADDRESS  process 0's host and a free port
                           (SLURM: the job's first node, port 61440 + job id % 4096, as JAX picks)
  --num-processes N        JAX_NUM_PROCESSES        (SLURM: SLURM_NTASKS)
  --process-id I           JAX_PROCESS_ID           0 .. N-1 (SLURM: SLURM_PROCID)
  --local-device-ids IDS   JAX_LOCAL_DEVICE_IDS     GPUs of this process, e.g. 3 or 0,1,2,3
                           (SLURM: SLURM_LOCALID with several tasks per node, all GPUs with
                           one task per node, 0 when SLURM gave the task a single GPU;
                           otherwise unset: every visible GPU)
  --gpus-per-node N        GPUS_PER_NODE            one task per node under SLURM: how many GPUs
                                                    (default: SLURM_GPUS_ON_NODE)
  --python PYTHON          PYTHON                   (default: python3)
  --dry-run                DRY_RUN=1                print the command instead of running it
EOF
}

: "${JAX_COORDINATOR_ADDRESS:=}" "${JAX_NUM_PROCESSES:=}" "${JAX_PROCESS_ID:=}" "${JAX_LOCAL_DEVICE_IDS:=}"
: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-}}" "${PYTHON:=python3}"
parse_flags "--coordinator=JAX_COORDINATOR_ADDRESS --num-processes=JAX_NUM_PROCESSES \
--process-id=JAX_PROCESS_ID --local-device-ids=JAX_LOCAL_DEVICE_IDS --gpus-per-node=GPUS_PER_NODE \
--python=PYTHON" "$@"

# SLURM's values go into shell arithmetic below: refuse any that is not a plain number.
number() { [[ $1 =~ ^(0|[1-9][0-9]{0,8})$ ]]; }
if [[ -n ${SLURM_PROCID:-} ]]; then
  for var in SLURM_PROCID SLURM_NTASKS SLURM_JOB_ID SLURM_LOCALID SLURM_STEP_NUM_NODES SLURM_NNODES; do
    if [[ -n ${!var:-} ]] && ! number "${!var}"; then
      usage_error "$var=${!var} is not a number; run under srun, or pass --coordinator, --num-processes and --process-id"
    fi
  done
  : "${JAX_NUM_PROCESSES:=$SLURM_NTASKS}" "${JAX_PROCESS_ID:=$SLURM_PROCID}"
  if [[ -z $JAX_COORDINATOR_ADDRESS ]]; then
    # The first host of a node list such as "gpu[007-012,020],big1" (what JAX itself does).
    nodes=${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}
    host=${nodes%%[[,]*}
    if [[ ${nodes:${#host}:1} == '[' ]]; then
      range=${nodes#*[}
      host+=${range%%[-,\]]*}
    fi
    JAX_COORDINATOR_ADDRESS=$host:$((61440 + SLURM_JOB_ID % 4096))
  fi
  if [[ -z $JAX_LOCAL_DEVICE_IDS ]]; then
    if [[ ${CUDA_VISIBLE_DEVICES:-} =~ ^[0-9]+$ ]]; then
      JAX_LOCAL_DEVICE_IDS=0
    elif ((SLURM_NTASKS > ${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}})); then
      JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID
    else
      # JAX would pick GPU SLURM_LOCALID alone; one process per node wants them all.
      require GPUS_PER_NODE --gpus-per-node
      [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus-per-node must be a number"
      JAX_LOCAL_DEVICE_IDS=0
      for ((i = 1; i < GPUS_PER_NODE; i++)); do JAX_LOCAL_DEVICE_IDS+=,$i; done
    fi
  fi
fi

require JAX_COORDINATOR_ADDRESS --coordinator
require JAX_NUM_PROCESSES --num-processes
require JAX_PROCESS_ID --process-id
# HOST: a name or IPv4 address, or [IPv6]; PORT: 1 to 65535.
if ! [[ $JAX_COORDINATOR_ADDRESS =~ ^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,4})$ ]] ||
  ((BASH_REMATCH[2] > 65535)); then
  usage_error "--coordinator must be HOST:PORT with a host name or address and a port of 1 to 65535 (got $JAX_COORDINATOR_ADDRESS)"
fi
# Decimal numbers without leading zeros (bash would read 08 as a bad octal number).
if ! [[ $JAX_NUM_PROCESSES =~ ^[1-9][0-9]{0,5}$ && $JAX_PROCESS_ID =~ ^(0|[1-9][0-9]{0,5})$ ]] ||
  ((JAX_PROCESS_ID >= JAX_NUM_PROCESSES)); then
  usage_error "--process-id must be 0 to --num-processes - 1 (got $JAX_PROCESS_ID of $JAX_NUM_PROCESSES)"
fi
[[ $JAX_LOCAL_DEVICE_IDS =~ ^([0-9]+(,[0-9]+)*)?$ ]] || usage_error "--local-device-ids must look like 0 or 0,1,2"

cmd=(env "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS" "JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES"
  "JAX_PROCESS_ID=$JAX_PROCESS_ID" ${JAX_LOCAL_DEVICE_IDS:+"JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"}
  "$PYTHON" -m crate_mae_jax.main "${REST[@]}")
if [[ $DRY_RUN == 1 ]]; then
  show "${cmd[@]}"
else
  show "${cmd[@]}" >&2
  exec "${cmd[@]}"
fi
