#!/usr/bin/env bash
# N ranks sharing ONE GPU (gloo): a test and debugging mode for seed / hybrid sharding on a one-GPU machine,
# not a speed mode (the ranks take turns on the device). Every argument after N is a Hydra override.
#   bash launch/gpu_shared.sh 2 sharding=seed
#   bash launch/gpu_shared.sh 4 sharding=hybrid sharding.seed_degree=2
set -euo pipefail
NPROC="${1:?usage: launch/gpu_shared.sh NPROC [hydra overrides...]}"
shift
ADDED="train.device=cuda train.ranks_per_device=$NPROC sharding.backend=gloo"
export MORPHO_LAUNCH_CMD="${MORPHO_LAUNCH_CMD:-bash launch/gpu_shared.sh $NPROC}" MORPHO_LAUNCH_ADDED="$ADDED"
# morpho_dist.torchrun: torchrun with one line per failure and morpho_dist's exit codes
exec python -m morpho_dist.torchrun --standalone --nproc_per_node="$NPROC" $ADDED "$@"
