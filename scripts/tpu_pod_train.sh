#!/usr/bin/env bash
# Example: train on a multi-host Cloud TPU slice (e.g. v4-32: 4 hosts x 4 chips).
#
#     TPU_NAME=my-slice ZONE=us-central2-b bash scripts/tpu_pod_train.sh --set train.steps=2000
#
# Every host of the slice (--worker=all) runs the same `jaxformer train` command; JAX finds the
# other hosts through the TPU metadata server (jax.distributed.initialize() with no
# arguments), so no --coordinator/--num-processes/--process-id flags are needed. Each process
# drives its host's chips; the global mesh spans the whole slice.
#
# Prerequisites on every worker (once):
#     gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
#         "git clone https://example.com/jaxformer.git && cd jaxformer && \
#          pip install -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
#
# RUN_DIR must be a location all hosts share (a gs:// bucket or an NFS/Filestore mount):
# checkpoints are written by all processes together; only process 0 writes logs and the
# config. Running the script again resumes from the latest checkpoint.

set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the zone of the slice, e.g. us-central2-b}"
EXPERIMENT=${EXPERIMENT:-experiments/gpt_tiny.py}
RUN_DIR=${RUN_DIR:-/mnt/shared/runs/$(basename "$EXPERIMENT" .py)-tpu}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
    PROJECT_FLAG=(--project "$PROJECT")
fi

# Extra "--set key=value" arguments of this script are passed through, quoted for the remote
# shell.
EXTRA=""
for arg in "$@"; do
    EXTRA+=" $(printf '%q' "$arg")"
done

REMOTE="cd jaxformer && jaxformer train $(printf '%q' "$EXPERIMENT")"
REMOTE+=" --run-dir $(printf '%q' "$RUN_DIR") --no-progress"
REMOTE+=" --set mesh.preset=fsdp --set train.batch_size=256${EXTRA}"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$REMOTE"
