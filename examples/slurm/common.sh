# shellcheck shell=bash
# Sourced by single_node.sbatch and multi_node.sbatch; runs in the batch shell on the job's first node.
#
# run_job ARGS...: start launch.sh ARGS... once per node with srun, and requeue the job when the run
# stopped for preemption after saving (launch.sh exit 75), so the requeued job resumes from that
# checkpoint. In a container (docker/README.md): CONTAINER_IMAGE=image.sqsh runs it through pyxis
# (srun --container-image), APPTAINER_IMAGE=image.sif through `apptainer exec --nv`; the current
# folder (the repository) is mounted at the same path, plus CONTAINER_MOUNTS (pyxis syntax) if set.

SLURM_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREEMPTED_EXIT=75  # launch.sh's exit code after a SIGUSR1/SIGTERM stop

run_job() {
  # The rendezvous host: the first node of the allocation (awk reads all lines: no SIGPIPE under pipefail).
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
  export MASTER_ADDR
  # A port per job, so two jobs sharing a first node do not collide.
  export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
  # One launcher per node; a preempted node's exit 75 must not kill the others while they save.
  local srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=0) runner=()
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$PWD:$PWD${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
                --container-workdir="$PWD")
  elif [[ -n "${APPTAINER_IMAGE:-}" ]]; then
    runner=(apptainer exec --nv --bind "$PWD" --pwd "$PWD" "$APPTAINER_IMAGE")
  fi
  local rc=0
  srun "${srun_args[@]}" "${runner[@]}" bash "$SLURM_SCRIPTS/launch.sh" "$@" || rc=$?
  if [[ "$rc" -eq "$PREEMPTED_EXIT" ]]; then
    echo "[slurm] job $SLURM_JOB_ID stopped for preemption and saved: requeueing it"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}
