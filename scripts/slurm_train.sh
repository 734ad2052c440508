#!/usr/bin/env bash
# Example SLURM batch script: one jaxformer training job over 2 nodes x 8 GPUs (16 devices).
#
#     sbatch scripts/slurm_train.sh                      # defaults below
#     EXPERIMENT=experiments/llama_tiny.py sbatch scripts/slurm_train.sh --set train.steps=2000
#
# SLURM starts one task (one Python process) per node; each process drives its node's 8 GPUs.
# No --coordinator/--num-processes/--process-id flags are needed: `jaxformer train` calls
# jax.distributed.initialize(), which reads SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID,
# SLURM_STEP_NODELIST (the first node is the coordinator) from the environment that srun
# sets for each task. After that every process sees all 16 devices in jax.devices() and the
# jitted train step runs as one SPMD program over the global mesh (NCCL between the GPUs).
#
# mesh.preset=fsdp shards parameters, gradients and optimizer state over all 16 devices; each
# process loads only its own rows of every batch. Only process 0 logs, prints and writes the
# run dir (TensorBoard events, config.json, tokenizer); checkpoints are written by all
# processes together (orbax), so --run-dir must be on a file system every node sees.
# Rerunning the same sbatch command resumes from the latest checkpoint.
#
#SBATCH --job-name=jaxformer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out

set -euo pipefail

EXPERIMENT=${EXPERIMENT:-experiments/gpt_tiny.py}
RUN_DIR=${RUN_DIR:-runs/$(basename "$EXPERIMENT" .py)-slurm}

# Activate the environment that has jaxformer and jax[cuda] installed, e.g.:
# source "$HOME/venvs/jaxformer/bin/activate"

# Each task owns all 8 GPUs of its node (one task per node, no per-task GPU binding); XLA may
# preallocate this share of each GPU's memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes ($SLURM_JOB_NODELIST), run dir $RUN_DIR"

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    jaxformer train "$EXPERIMENT" \
    --run-dir "$RUN_DIR" \
    --no-progress \
    --set mesh.preset=fsdp \
    --set train.batch_size=256 \
    "$@"
