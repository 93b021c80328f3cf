#!/usr/bin/env bash
# Launch `pagedopt train --distributed fsdp|ddp` with torchrun on one or many nodes.
#
# Run the same command on every node of the job (Slurm: deploy/slurm/train.sbatch does it):
#
#   NNODES=2 MASTER_ADDR=node0.example MASTER_PORT=29500 RUN_ID=job42 \
#     deploy/torchrun/launch.sh --steps 2000 --optimizer AdamW8bit
#
# Arguments after the script name go to the training command. Settings (environment):
#   NNODES          number of nodes (default 1; with 1 and no MASTER_ADDR: --standalone)
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 1 without GPUs)
#   MASTER_ADDR     rendezvous host: any node of the job, reachable from all (default 127.0.0.1)
#   MASTER_PORT     rendezvous port (default 29500)
#   RUN_ID          rendezvous id, the same on every node (default pagedopt)
#   MAX_RESTARTS    torchrun restarts of the whole worker group on failure (default 0); with
#                   CHECKPOINT_DIR the restarted workers resume from the last checkpoint
#   DISTRIBUTED     fsdp or ddp (default fsdp)
#   METRICS_PORT    Prometheus base port; rank r on a node serves METRICS_PORT + LOCAL_RANK
#                   (default 9460; empty: no metrics flags)
#   METRICS_ADDR    address the metrics endpoints bind (default 127.0.0.1; 0.0.0.0 to scrape
#                   from another host)
#   TRAIN_MODULE    the python module (and subcommand) to run (default "pagedopt train")
#   PYTHON          interpreter with torch and pagedopt installed (default python3)
set -euo pipefail

nnodes="${NNODES:-1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && gpus="$(nvidia-smi --list-gpus 2>/dev/null | wc -l)" && ((gpus > 0)); then
    NPROC_PER_NODE="$gpus"
  else
    NPROC_PER_NODE=1
  fi
fi
distributed="${DISTRIBUTED:-fsdp}"
case "$distributed" in
  fsdp | ddp) ;;
  *) echo "launch.sh: DISTRIBUTED=$distributed (expected fsdp or ddp)" >&2; exit 2 ;;
esac
read -r -a train_module <<< "${TRAIN_MODULE:-pagedopt train}"

rendezvous=()
if [[ "$nnodes" == "1" && -z "${MASTER_ADDR:-}" ]]; then
  rendezvous=(--standalone)
else
  rendezvous=(
    --rdzv-backend=c10d
    "--rdzv-endpoint=${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
    "--rdzv-id=${RUN_ID:-pagedopt}"
  )
fi

metrics=()
if [[ -n "${METRICS_PORT-9460}" ]]; then
  metrics=(--metrics-port "${METRICS_PORT:-9460}" --metrics-addr "${METRICS_ADDR:-127.0.0.1}")
fi

checkpoints=()
if [[ -n "${CHECKPOINT_DIR:-}" ]]; then
  checkpoints=(--checkpoint-dir "$CHECKPOINT_DIR" --checkpoint-interval "${CHECKPOINT_INTERVAL:-1800}" --resume)
fi
# One OpenMP thread per worker unless told otherwise: N workers share the node's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
restarts="${MAX_RESTARTS:-0}"
# With restarts, the workers must not share torchrun's rendezvous store: since torch 2.4 a
# restarted worker group sharing it can read the previous attempt's addresses, and its gloo or
# NCCL init fails ("connection refused") or hangs (pytorch/pytorch#135712, #167288). Measured
# with torch 2.13 and gloo, one of 2 workers killed (tests/test_deploy.py): with the shared store
# 6 of 13 restarts failed or hung (a bare torch script: 4 of 5), without it 0 of 14 (bare: 0 of 6).
if ((restarts > 0)); then
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
fi

"${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes="$nnodes" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --max-restarts="$restarts" \
  "${rendezvous[@]}" \
  -m "${train_module[@]}" --distributed "$distributed" "${metrics[@]}" "${checkpoints[@]}" "$@" &
torchrun_pid=$!
preempted=0
forward_preemption() {
  preempted=1
  local worker
  for worker in $(pgrep -P "$torchrun_pid" || true); do
    kill -USR1 "$worker" 2>/dev/null || true
  done
}
trap forward_preemption TERM INT USR1
status=0
while true; do
  wait "$torchrun_pid" && status=0 || status=$?
  # wait returns early (status > 128) when a trapped signal arrives: keep waiting for torchrun.
  if kill -0 "$torchrun_pid" 2>/dev/null; then continue; fi
  break
done
if ((preempted)); then
  echo "launch.sh: preempted (torchrun exit status $status); resume with the same command" >&2
fi
exit "$status"
