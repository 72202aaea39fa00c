#!/usr/bin/env bash
# One node, N CPU processes (gloo). Every argument after N is a Hydra override, passed through unchanged.
#   bash launch/cpu.sh 2 sharding=seed train.steps=200
set -euo pipefail
NPROC="${1:?usage: launch/cpu.sh NPROC [hydra overrides...]}"
shift
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# how this run was launched, for the resume command printed on an interrupt
export MORPHO_LAUNCH_CMD="${MORPHO_LAUNCH_CMD:-bash launch/cpu.sh $NPROC}" MORPHO_LAUNCH_ADDED="train.device=cpu"
# morpho_dist.torchrun: torchrun with one line per failure and morpho_dist's exit codes
exec python -m morpho_dist.torchrun --standalone --nproc_per_node="$NPROC" train.device=cpu "$@"
