#!/usr/bin/env bash
# One node, N GPUs (NCCL, one process per GPU). Every argument after N is a Hydra override.
#   bash launch/gpus.sh 1                       # the default job on one GPU
#   bash launch/gpus.sh 8 sharding=hybrid sharding.seed_degree=2
set -euo pipefail
NGPU="${1:?usage: launch/gpus.sh NGPU [hydra overrides...]}"
shift
export MORPHO_LAUNCH_CMD="${MORPHO_LAUNCH_CMD:-bash launch/gpus.sh $NGPU}" MORPHO_LAUNCH_ADDED="train.device=cuda"
exec python -m morpho_dist.torchrun --standalone --nproc_per_node="$NGPU" train.device=cuda "$@"
