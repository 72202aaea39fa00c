#!/usr/bin/env bash
# N ranks sharing ONE GPU (gloo): a test and debugging mode for seed / hybrid sharding on a one-GPU machine,
# not a speed mode (the ranks take turns on the device). Every argument after N is a Hydra override.
#   bash launch/gpu_shared.sh 2 sharding=seed
#   bash launch/gpu_shared.sh 4 sharding=hybrid sharding.seed_degree=2
set -euo pipefail
NPROC="${1:?usage: launch/gpu_shared.sh NPROC [hydra overrides...]}"
shift
exec python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m morpho_dist.train \
  train.device=cuda train.ranks_per_device="$NPROC" sharding.backend=gloo "$@"
