"""Mutation testing with cosmic-ray over the modules whose logic the fast unit tests must pin down.

    pip install -e '.[mutation]'                      # cosmic-ray
    nice -n 19 python scripts/mutation.py             # every module below (an hour or more on 2 cores)
    nice -n 19 python scripts/mutation.py lifecycle schedules --report docs/mutation_report.txt

For each module, cosmic-ray plants one small change at a time (a comparison moved by one, + for -, * for /, a
constant changed, a condition negated, and/or swapped, a loop made empty) into a scratch copy of the repository
and runs that module's fast unit tests; a mutant the tests pass "survives". The operator set is cut to these
classic ones (``KEEP``): the 10 replacements of every binary operator and the 9 of every comparison would
multiply the runtime by about five and mostly repeat each other. The report lists the survival rate per module
and every survivor (file, line, operator, the source line).

The repository itself is never touched (cosmic-ray edits files in place: here, in the scratch copy).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module (under morpho_dist/) -> the fast unit tests that must kill its mutants
MODULES = {
    "lifecycle": ["tests/unit/test_lifecycle.py", "tests/unit/test_commands.py"],
    "schedules": ["tests/unit/test_schedules.py"],
    "optim": ["tests/unit/test_optim.py"],
    "controller": ["tests/unit/test_controller.py"],
    "checkpoint": ["tests/unit/test_checkpoint_unit.py"],
    "reliability": ["tests/unit/test_divergence.py", "tests/unit/test_seed_guard.py"],
    "ops/reference": ["tests/unit/test_reference.py", "tests/unit/test_blend_formulas.py"],
}

# Operators kept (regular expressions over cosmic-ray's operator names); every other one is filtered out.
KEEP = [
    r"core/ReplaceComparisonOperator_(Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Lt_GtE|GtE_Lt|Gt_LtE|LtE_Gt|Eq_NotEq|NotEq_Eq)",
    r"core/ReplaceComparisonOperator_(Is_IsNot|IsNot_Is|In_NotIn|NotIn_In)",
    r"core/ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|BitAnd_BitOr|BitOr_BitAnd)",
    r"core/NumberReplacer",
    r"core/AddNot",
    r"core/ReplaceAndWithOr",
    r"core/ReplaceOrWithAnd",
    r"core/ReplaceTrueWithFalse",
    r"core/ReplaceFalseWithTrue",
    r"core/ZeroIterationForLoop",
    r"core/ReplaceUnaryOperator_Delete_(USub|Not)",
]

CONFIG = """[cosmic-ray]
module-path = "morpho_dist/{module}.py"
timeout = {timeout}
excluded-modules = []
test-command = "{python} -m pytest -x -q -p no:cacheprovider {tests}"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = {exclude}
"""


def _excluded(session: str) -> list[str]:
    """Anchored regexes for the operators of this session that KEEP does not keep."""
    with sqlite3.connect(session) as db:
        names = sorted({row[0] for row in db.execute("SELECT operator_name FROM mutation_specs")})
    return [f"^{re.escape(n)}$" for n in names if not any(re.fullmatch(k, n) for k in KEEP)]


def _results(session: str) -> tuple[dict[str, int], list[tuple]]:
    """Counts by outcome (killed, survived, incompetent, skipped) and the survivors (module, line, operator)."""
    counts = {"killed": 0, "survived": 0, "incompetent": 0, "skipped": 0}
    survivors = []
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT m.module_path, m.start_pos_row, m.operator_name, r.worker_outcome, r.test_outcome "
            "FROM mutation_specs m JOIN work_results r ON m.job_id = r.job_id"
        ).fetchall()
    for path, line, op, worker, test in rows:
        if worker == "SKIPPED":
            counts["skipped"] += 1
        elif worker != "NORMAL" or test == "INCOMPETENT":
            counts["incompetent"] += 1
        elif test == "SURVIVED":
            counts["survived"] += 1
            survivors.append((path, line, op))
        else:
            counts["killed"] += 1
    return counts, sorted(survivors)


def run_module(module: str, scratch: str, timeout: float, env: dict) -> tuple[dict[str, int], list[tuple], float]:
    tests = " ".join(MODULES[module])
    name = module.replace("/", "_")
    session = os.path.join(scratch, f"{name}.sqlite")
    config = os.path.join(scratch, f"{name}.toml")
    fill = {"module": module, "timeout": timeout, "python": sys.executable, "tests": tests}
    with open(config, "w") as fh:
        fh.write(CONFIG.format(**fill, exclude="[]"))
    work = os.path.join(scratch, "repo")
    subprocess.run(["cosmic-ray", "init", config, session], cwd=work, env=env, check=True, capture_output=True)
    with open(config, "w") as fh:
        fh.write(CONFIG.format(**fill, exclude="[" + ", ".join(f"'{e}'" for e in _excluded(session)) + "]"))
    subprocess.run(["cr-filter-operators", session, config], cwd=work, env=env, check=True, capture_output=True)
    t0 = time.time()
    subprocess.run(["cosmic-ray", "exec", config, session], cwd=work, env=env, check=True, capture_output=True)
    counts, survivors = _results(session)
    return counts, survivors, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help=f"modules (default: all of {list(MODULES)})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    parser.add_argument("--report", help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (its sqlite sessions)")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; allowed: {list(MODULES)}")
    if shutil.which("cosmic-ray") is None:
        sys.exit("error: cosmic-ray is not installed (pip install -e '.[mutation]')")
    scratch = tempfile.mkdtemp(prefix="morpho-mutation-")
    work = os.path.join(scratch, "repo")
    ignore = shutil.ignore_patterns(".git", "outputs", "wandb", "multirun", "__pycache__", ".hypothesis", "*.egg-info")
    shutil.copytree(REPO, work, ignore=ignore)
    env = {**os.environ, "PYTHONPATH": work, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    lines, total = [], {"killed": 0, "survived": 0, "incompetent": 0, "skipped": 0}
    try:
        for module in args.modules:
            counts, survivors, seconds = run_module(module, scratch, args.timeout, env)
            for k, v in counts.items():
                total[k] += v
            tested = counts["killed"] + counts["survived"]
            rate = counts["survived"] / tested if tested else 0.0
            lines.append(
                f"{module}: {tested} mutants tested, {counts['survived']} survived ({rate:.1%}), "
                f"{counts['incompetent']} incompetent, {counts['skipped']} filtered out; {seconds:.0f} s"
            )
            with open(os.path.join(work, "morpho_dist", f"{module}.py")) as fh:
                source = fh.read().splitlines()
            for path, line, op in survivors:
                text = source[line - 1].strip() if 0 < line <= len(source) else ""
                lines.append(f"    survived: {path}:{line} {op}: {text}")
            print("\n".join(lines[-1 - len(survivors) :]), flush=True)
        tested = total["killed"] + total["survived"]
        lines.append(f"total: {tested} tested, {total['survived']} survived ({total['survived'] / max(tested, 1):.1%})")
        print(lines[-1])
        if args.report:
            with open(args.report, "w") as fh:
                fh.write("\n".join(lines) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"sessions kept in {scratch}")


if __name__ == "__main__":
    main()
