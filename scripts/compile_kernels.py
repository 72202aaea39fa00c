"""Compile the seeded kernels for a GPU target without a GPU (Triton's frontend, LLVM and ptxas only).

    TRITON_INTERPRET=0 python scripts/compile_kernels.py [--arch 90] [--warps 2,4]

Catches what the interpreter cannot (type errors in loop-carried values, shared-memory use) before any device
time is spent; tests/kernels/test_compile.py runs it. Prints one line per variant with its registers, spilled
bytes (ptxas stack frame) and shared memory: the resource report that decides occupancy.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from morpho_dist.kernels.columns import _columns_bwd_kernel, _columns_fwd_kernel
from morpho_dist.kernels.launch import lowrank_bwd_shape_args, lowrank_fwd_shape_args
from morpho_dist.kernels.lowrank import _lowrank_bwd_kernel, _lowrank_fwd_kernel

_FLOAT_ARGS = {"dead_eps", "rec_scale", "inv_count"}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


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


def _attrs(fn, signature: dict) -> dict:
    """The specialisation a launch gives real inputs: 16-byte aligned pointers, sizes divisible by 16."""
    divisible = {"H", "C", "R", "rows_per_split", "stats_split_stride", "grad_split_stride"}
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name in divisible
    }


def _resources(kernel) -> str:
    """Registers and stack frame from the cubin (cuobjdump -res-usage), when Triton ships cuobjdump."""
    if not os.path.exists(_CUOBJDUMP):
        return "regs=?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(kv.split(":") for line in out.splitlines() if "REG:" in line for kv in line.split() if ":" in kv)
    return f"regs={fields.get('REG', '?')} stack={fields.get('STACK', '?')}"


def variants(warps: list[int]):
    """(kernel, constexprs, dtype, num_warps) of every compiled variant."""
    common = [dict(USE_ATOMICS=not det, HAS_STATS=True) for det in (False, True)]
    # (DIAGONAL, CP, SPP, BLOCK_T, DENSE, ALL_IDLE)
    columns = [(False, 16, 16, 16, True, False), (False, 64, 4, 32, False, False), (True, 1, 256, 16, True, False)]
    columns += [(True, 4, 16, 32, False, False), (False, 16, 16, 16, True, True), (False, 1, 256, 16, True, True)]
    for (diag, cp, spp, bt, dense, idle), c, dtype, w in itertools.product(columns, common, ["fp32", "bf16"], warps):
        ce = dict(DIAGONAL=diag, ALL_IDLE=idle, BLOCK_T=bt, CP=cp, SPP=spp, DENSE=dense, **c)
        yield _columns_fwd_kernel, dict(ce, ZERO_REC=not diag), dtype, w
        yield _columns_bwd_kernel, dict(ce, ZERO_GRADS=idle and c["USE_ATOMICS"]), dtype, w
    lowrank = [(16, 64, True), (16, 128, True), (64, 32, False), (256, 16, False)]
    for (cp, bt, rank1), c, dtype, w in itertools.product(lowrank, common, ["fp32", "bf16"], warps):
        ce = dict(ACT=1, BLOCK_T=bt, CP=cp, RP=16, RANK=16, DOT_PRECISION="tf32", RANK1=rank1, **c)
        fold = lowrank_fwd_shape_args(bt, cp, 4 if dtype == "fp32" else 2, w, rank1)
        yield _lowrank_fwd_kernel, dict(ce, **fold), dtype, w
        yield _lowrank_bwd_kernel, dict(ce, **lowrank_bwd_shape_args(bt, cp)), dtype, w


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--warps", default="4", help="comma-separated num_warps values to compile")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for fn, constexprs, dtype, warps in variants([int(w) for w in args.warps.split(",")]):
        shown = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k not in ("HAS_STATS",))
        name = f"{fn.__name__} [{shown}] {dtype} warps={warps}"
        try:
            sig = _signature(fn, constexprs, dtype)
            src = ASTSource(fn, sig, constexprs=constexprs, attrs=_attrs(fn, sig))
            kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": 1})
            print(f"ok   {name}: {_resources(kernel)} shared={kernel.metadata.shared}", flush=True)
        except Exception as e:  # noqa: BLE001  report every failing variant, then fail
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
