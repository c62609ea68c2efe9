#!/usr/bin/env bash
# One slim job over several SLURM nodes: torchrun on every node (experiments/launch/torchrun_multinode.sh),
# node 0 as the rendezvous. Submit from the repository root (the job runs there):
#
#   RUN_DIR=/shared/runs/r1_w4a8 sbatch --partition=h20 experiments/launch/slurm_multinode.sh \
#       hardware=h20x16 scheme=w4a8 model=deepseek_r1 model.path=/models/DeepSeek-R1-0528
#
# RUN_DIR must be on a filesystem every node sees. The #SBATCH lines below are defaults; sbatch options on
# the command line override them (--nodes must match the hardware preset's nodes). Extra arguments are slim
# overrides. For single-node sweeps use the Hydra launcher instead: python -m slim.main -m hydra/launcher=slurm_h20 ...
#SBATCH --job-name=slim
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slim-%j.out
set -euo pipefail
: "${SLURM_JOB_ID:?submit this script with sbatch (see its header)}"
: "${RUN_DIR:?set RUN_DIR (a run directory on a shared filesystem)}"
REPO="${SLIM_REPO:-$SLURM_SUBMIT_DIR}"
[[ -f "$REPO/experiments/launch/torchrun_multinode.sh" ]] \
    || { echo "error: $REPO is not the slim repository: submit from its root or set SLIM_REPO" >&2; exit 2; }

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR RUN_DIR NNODES="$SLURM_JOB_NUM_NODES" NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
export MASTER_PORT="${MASTER_PORT:-29500}"
echo "slim: $NNODES nodes x $NPROC_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
# One task per node; each gets its node rank from SLURM_NODEID. --kill-on-bad-exit stops every node if one fails.
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'NODE_RANK="$SLURM_NODEID" exec bash "$0" "$@"' "$REPO/experiments/launch/torchrun_multinode.sh" "$@"
