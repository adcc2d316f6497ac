#!/usr/bin/env bash
# One launcher per node, started by the sbatch scripts through `srun --ntasks-per-node=1`.
#
#   launch.sh train --config my.yaml key=value ...    (any `selfjudge` subcommand and its arguments)
#
# Runs torchrun (one training process per GPU) with a c10d rendezvous on $MASTER_ADDR:$MASTER_PORT,
# the job's first node, so every node's torchrun finds the others. SIGUSR1 (sbatch --signal=USR1@120)
# and SIGTERM are passed on to the training processes, which save a checkpoint at the end of the
# step and exit 0 (megatron_selfjudge/preemption.py); the launcher then exits 75 and the batch
# script requeues the job. Variables below may be set before sbatch to override the defaults.
set -euo pipefail

PREEMPTED_EXIT=75  # EX_TEMPFAIL: stopped by a signal after saving; common.sh requeues on it

: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm job: start it with the sbatch scripts in this folder}"
: "${MASTER_ADDR:?MASTER_ADDR, the first node of the job, is set by common.sh before srun}"
: "${MASTER_PORT:?MASTER_PORT is set by common.sh before srun}"

gpus_on_node() {
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    echo 1
  fi
}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus_on_node)}
if ! [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch.sh: NPROC_PER_NODE='$NPROC_PER_NODE' is not a process count (no GPU found? set NPROC_PER_NODE)" >&2
  exit 2
fi

# --- environment of the training processes -------------------------------------------------
# NCCL's log level: WARN keeps logs short; INFO prints the topology and transports chosen (bug reports).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Interfaces for NCCL's bootstrap and socket traffic: any but loopback and docker bridges (set the fabric's, e.g. ib0).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
# A failed or timed-out NCCL collective aborts the process, so the job ends instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# One hardware queue per GPU: megatron's tensor-parallel communication overlap relies on in-order kernel launch.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# CPU threads per training process: the task's cores shared among this node's processes.
threads=$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
# Log lines reach the job log when printed, also right before a preemption.
export PYTHONUNBUFFERED=1
# Seconds torchrun waits for its processes after SIGTERM before SIGKILL: time to finish a step and save.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

echo "[launch.sh] node ${SLURM_NODEID:-0} of ${SLURM_NNODES:-1} ($(hostname)): $NPROC_PER_NODE process(es)," \
     "c10d rendezvous ${SLURM_JOB_ID} at $MASTER_ADDR:$MASTER_PORT" >&2

torchrun_pid=""
stop_signal=""
# shellcheck disable=SC2329  # invoked by the traps below
forward() {  # $1: USR1 or TERM. Pass it to the training processes, torchrun's children.
  stop_signal=$1
  if [[ -n "$torchrun_pid" ]]; then
    pkill "-$1" -P "$torchrun_pid" || true  # none yet while torchrun starts them
  fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# torchrun has no SIGUSR1 handler, and the default action would kill it when Slurm signals every
# process of the step: it ignores SIGUSR1 (the launcher forwards it instead). The training
# processes inherit the ignore until the trainer installs its handler, so an early signal is harmless.
( trap '' USR1; exec torchrun --nnodes="${SLURM_NNODES:-1}" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=0 -m megatron_selfjudge.cli "$@" ) &
torchrun_pid=$!

while kill -0 "$torchrun_pid" 2>/dev/null; do
  wait "$torchrun_pid" || true  # returns early whenever a trapped signal arrives
done
rc=0
wait "$torchrun_pid" || rc=$?

if [[ -n "$stop_signal" ]]; then
  echo "[launch.sh] $(hostname): stopped by SIG$stop_signal (torchrun exit $rc); exit $PREEMPTED_EXIT to requeue" >&2
  exit "$PREEMPTED_EXIT"
fi
exit "$rc"
