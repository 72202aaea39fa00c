#!/usr/bin/env bash
# One node, N CPU processes (gloo). Every argument after N is a Hydra override, passed through unchanged.
#   bash launch/cpu.sh 2 sharding=seed train.steps=200
set -euo pipefail
NPROC="${1:?usage: launch/cpu.sh NPROC [hydra overrides...]}"
shift
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m morpho_dist.train \
  train.device=cpu "$@"
