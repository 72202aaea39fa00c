"""Compile the seeded kernels for a GPU target without a GPU (Triton's frontend, LLVM and ptxas only).

    TRITON_INTERPRET=0 python scripts/compile_kernels.py [--arch 90]

Catches what the interpreter cannot (type errors in loop-carried values, shared-memory use) before any device
time is spent; tests/kernels/test_compile.py runs it. Prints one line per variant with its shared memory.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from morpho_dist.kernels.seeded import KIND_DIAGONAL, KIND_LOWRANK, _seeded_bwd_kernel, _seeded_fwd_kernel

_FLOAT_ARGS = {"dead_eps", "rec_scale", "inv_count"}


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr"):
            sig[name] = f"*{dtype}"
        elif name in ("stage_ptr", "blend_ptr"):
            sig[name] = "*i8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    variants = itertools.product(
        [
            (KIND_LOWRANK, 16, 4, True),
            (KIND_LOWRANK, 32, 2, False),
            (KIND_DIAGONAL, 1, 64, True),
            (KIND_DIAGONAL, 4, 16, False),
        ],  # (kind, CP, SPP, DENSE)
        [False, True],  # deterministic
        ["fp32", "bf16"],
    )
    for (kind, cp, spp, dense), det, dtype in variants:
        constexprs = dict(
            KIND=kind, ACT=1, BLOCK_T=32, CP=cp, RP=16, SPP=spp, USE_ATOMICS=not det, HAS_STATS=True,
            DOT_PRECISION="tf32", DENSE=dense,
        )  # fmt: skip
        for fn in (_seeded_fwd_kernel, _seeded_bwd_kernel):
            name = f"{fn.__name__} kind={kind} CP={cp} SPP={spp} dense={dense} deterministic={det} {dtype}"
            try:
                src = ASTSource(fn, _signature(fn, constexprs, dtype), constexprs=constexprs)
                kernel = triton.compile(src, target=target)
                print(f"ok   {name}: shared={kernel.metadata.shared}", flush=True)
            except Exception as e:  # noqa: BLE001  report every failing variant, then fail
                failures += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
