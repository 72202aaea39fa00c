"""Run one seeded-op workload a few times, for a kernel profiler (ncu) to capture.

    ncu --kernel-name regex:_seeded --launch-skip 4 --launch-count 2 --section SpeedOfLight \\
        python scripts/profile_kernel.py --workload wide --mix dormant --mode fwd+bwd
"""

from __future__ import annotations

import argparse

import torch
from bench_op import WORKLOADS, make_call, make_inputs  # scripts/ is on sys.path when run as a script

from morpho_dist.kernels.options import KernelOptions
from morpho_dist.ops import seeded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="wide", choices=list(WORKLOADS))
    ap.add_argument("--mix", default="dormant", choices=["dormant", "third"])
    ap.add_argument("--mode", default="fwd", choices=["fwd", "fwd+bwd"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--block-rows", type=int, default=KernelOptions.block_rows)
    ap.add_argument("--block-cols", type=int, default=KernelOptions.block_cols)
    ap.add_argument("--num-warps", type=int, default=KernelOptions.num_warps)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    t, n, c, kind, rank = WORKLOADS[args.workload]
    grad = args.mode == "fwd+bwd"
    inputs = make_inputs(t, n, c, kind, rank, args.mix, getattr(torch, args.dtype), torch.device("cuda"), grad)
    opts = KernelOptions(
        block_rows=args.block_rows, block_cols=args.block_cols, num_warps=args.num_warps, dot_precision="tf32"
    )
    run = make_call(seeded, inputs, kind, grad, torch.randn_like(inputs[0]), backend="triton", options=opts,
                    check_ids=False)  # fmt: skip
    for _ in range(args.calls):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
