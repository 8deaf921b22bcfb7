# Shared launch logic for the sbatch scripts in examples/slurm/ (sourced, not run).
#
# The sourcing script sets TRAIN_ARGS (a bash array of pretrain_tri.py flags) and may set:
#   TRI_DIR          repository root on the compute nodes       (default: the directory sbatch was run from)
#   LAUNCHER         srun      one srun task per GPU; each process reads SLURM_PROCID/SLURM_LOCALID/
#                              SLURM_NTASKS itself (default; works with any torch)
#                    torchrun  one srun task per node running torchrun --nproc-per-node NPROC_PER_NODE
#                              (needs torch >= 2.9 for --signals-to-handle, which forwards SIGUSR1)
#   NPROC_PER_NODE   processes per node for torchrun             (default: SLURM_NTASKS_PER_NODE, else 8)
#   PYTHON           interpreter on the nodes                    (default: TRI_DIR/.venv/bin/python if present, else python)
#   MASTER_ADDR      rendezvous host                             (default: first of `scontrol show hostnames`)
#   MASTER_PORT      rendezvous port                             (default: 20000 + SLURM_JOB_ID % 20000)
#   CONTAINER_IMAGE  run inside a pyxis/enroot container: adds --container-image (and CONTAINER_MOUNTS,
#                    --container-workdir) to srun
#   SRUN_ARGS        extra srun flags (bash words)
#   TRI_DRY_RUN=1    print the srun command, one word per line, and exit (used by tests/test_slurm.py)
#
# Preemption: with `#SBATCH --signal=B:USR1@120` SLURM signals only this batch shell; the trap below
# forwards USR1 (and TERM) to the srun step, srun hands it to every task (torchrun forwards it on to
# its workers), every rank finishes its iteration, saves, and exits 0; with --slurm-requeue rank 0
# then runs `scontrol requeue`, and the requeued job resumes from the newest complete checkpoint in
# --save (auto-resume: no --load needed). `scancel --signal=USR1 JOBID` reaches the tasks directly.

set -euo pipefail

TRI_DIR=${TRI_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$TRI_DIR"
LAUNCHER=${LAUNCHER:-srun}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$TRI_DIR/.venv/bin/python" && -z "${CONTAINER_IMAGE:-}" ]]; then PYTHON="$TRI_DIR/.venv/bin/python"; else PYTHON=python; fi
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# ---- rendezvous: the first host of the allocation, a port derived from the job id (same after requeue)
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# ---- NCCL / InfiniBand / CUDA environment (the usual settings for H100 + InfiniBand; ignored on CPU)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}    # Megatron: TP/SP comm overlap needs ordered kernel queues
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed/timed-out collective ends the process (no hang)
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}      # flight-recorder dump on a collective timeout
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}               # flight-recorder entries (older torch: TORCH_NCCL_TRACE_BUFFER_SIZE)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}             # bootstrap over the node's real interface
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}                           # tolerate transient fabric hiccups at scale
export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-4}
# export NCCL_IB_HCA=mlx5_0,mlx5_1,...        # site-specific: the compute-fabric HCAs (one per GPU on DGX H100)
# export NCCL_IB_GID_INDEX=3                  # RoCE fabrics only
# export NCCL_NET_GDR_LEVEL=PHB               # GPUDirect RDMA policy, if the site's default is wrong
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

# ---- the srun step
CONTAINER=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then  # pyxis/enroot, e.g. CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.01-py3
  CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-workdir="$TRI_DIR"
             --container-mounts="${CONTAINER_MOUNTS:-$TRI_DIR:$TRI_DIR}")
fi
read -r -a EXTRA_SRUN <<< "${SRUN_ARGS:-}"
if [[ "$LAUNCHER" == srun ]]; then
  # one task per GPU; every task sees all the node's GPUs and picks SLURM_LOCALID (NCCL keeps NVLink P2P)
  CMD=(srun --ntasks="$SLURM_NTASKS" --kill-on-bad-exit=1 "${CONTAINER[@]}" "${EXTRA_SRUN[@]}"
       "$PYTHON" pretrain_tri.py "${TRAIN_ARGS[@]}")
elif [[ "$LAUNCHER" == torchrun ]]; then
  CPUS_PER_NODE=$(( ${SLURM_CPUS_PER_TASK:-1} * NPROC_PER_NODE ))
  TORCHRUN_ARGS=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
                 --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
                 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-600}"
                 pretrain_tri.py "${TRAIN_ARGS[@]}")
  # one task per node; SLURM_NODEID differs per node, so it is expanded inside each task
  CMD=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE"
       --kill-on-bad-exit=1 "${CONTAINER[@]}" "${EXTRA_SRUN[@]}"
       bash -c 'exec "$0" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"' "$PYTHON" "${TORCHRUN_ARGS[@]}")
else
  echo "launch.sh: LAUNCHER=$LAUNCHER: use srun or torchrun" >&2
  exit 2
fi

if [[ -n "${TRI_DRY_RUN:-}" ]]; then
  printf '%s\n' "${CMD[@]}"
  exit 0
fi

echo "launch.sh: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${NNODES} node(s), LAUNCHER=${LAUNCHER}," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, $(date -Is)"

# ---- run it in the background so this shell can forward SLURM's signals to it
STEP_PID=
forward() {
  echo "launch.sh: batch shell got SIG$1 at $(date -Is); forwarding to the training step"
  if [[ -n "$STEP_PID" ]]; then kill -s "$1" "$STEP_PID" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${CMD[@]}" &
STEP_PID=$!
while :; do
  rc=0
  wait "$STEP_PID" || rc=$?
  # a wait interrupted by a trapped signal returns >128 while the step still runs: wait again
  if (( rc <= 128 )) || ! kill -0 "$STEP_PID" 2>/dev/null; then break; fi
done
echo "launch.sh: training step exited with $rc at $(date -Is)"
exit "$rc"
