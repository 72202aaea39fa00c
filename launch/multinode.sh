#!/usr/bin/env bash
# Several nodes: run this on EVERY node with the same NNODES and ENDPOINT (host:port of any one node, reachable
# from all; c10d rendezvous). NPROC processes per node (one per GPU). Arguments after ENDPOINT: Hydra overrides.
#   bash launch/multinode.sh 2 8 node0.example:29500 sharding=hybrid sharding.seed_degree=8
set -euo pipefail
NNODES="${1:?usage: launch/multinode.sh NNODES NPROC_PER_NODE HOST:PORT [hydra overrides...]}"
NPROC="${2:?usage: launch/multinode.sh NNODES NPROC_PER_NODE HOST:PORT [hydra overrides...]}"
ENDPOINT="${3:?usage: launch/multinode.sh NNODES NPROC_PER_NODE HOST:PORT [hydra overrides...]}"
shift 3
# Every rank must use one run dir: on a shared filesystem, pick it here (same on all nodes) unless given.
export MORPHO_RUN_DIR="${MORPHO_RUN_DIR:-outputs/${RUN_ID:-multinode}}"
export MORPHO_LAUNCH_CMD="${MORPHO_LAUNCH_CMD:-bash launch/multinode.sh $NNODES $NPROC $ENDPOINT}"
exec python -m morpho_dist.torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$ENDPOINT" --rdzv_id="${RUN_ID:-morpho}" "$@"
