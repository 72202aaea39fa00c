"""Mutation testing with cosmic-ray over the modules whose logic the fast unit tests must pin down.

    pip install -e '.[mutation]'                      # cosmic-ray
    nice -n 19 python scripts/mutation.py             # every module below (an hour or more on 2 cores)
    nice -n 19 python scripts/mutation.py lifecycle schedules --report docs/mutation_report.txt
    nice -n 19 python scripts/mutation.py --named     # issue 28's five hand-made mutants (NAMED), about a minute

For each module, cosmic-ray plants one small change at a time (a comparison moved by one, + for -, * for /, a
constant changed, a condition negated, and/or swapped, a loop made empty) into a scratch copy of the repository
and runs that module's fast unit tests; a mutant the tests pass "survives". The operator set is cut to these
classic ones (``KEEP``): the 10 replacements of every binary operator and the 9 of every comparison would
multiply the runtime by about five and mostly repeat each other. The report lists the survival rate per module
and every survivor (file, line, operator, the source line).

Each mutant's tests run in a process forked from a server that has already imported torch, pytest and its
plugins, hypothesis, hydra and triton (``--server``; never ``morpho_dist`` itself, which each fork imports afresh
from the mutated copy). On 2 CPU cores that cuts the start-up per mutant from about 5 s to 0.2 s, most of the cost
of a mutant. ``--no-server`` runs a fresh ``python -m pytest`` per mutant instead (the same outcomes, slower).

The repository itself is never touched (cosmic-ray edits files in place: here, in the scratch copy).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module (under morpho_dist/) -> the fast unit tests that must kill its mutants
MODULES = {
    "lifecycle": ["tests/unit/test_lifecycle.py", "tests/unit/test_commands.py"],
    "schedules": ["tests/unit/test_schedules.py", "tests/unit/test_config_defaults.py"],
    "optim": ["tests/unit/test_optim.py"],
    "controller": ["tests/unit/test_controller.py", "tests/unit/test_config_defaults.py"],
    "checkpoint": ["tests/unit/test_checkpoint_unit.py", "tests/unit/test_resume.py"],
    "resume": ["tests/unit/test_resume.py", "tests/unit/test_checkpoint_unit.py"],
    "reliability": ["tests/unit/test_divergence.py", "tests/unit/test_seed_guard.py", "tests/unit/test_desync.py"],
    "ops/reference": ["tests/unit/test_blend_formulas.py", "tests/unit/test_reference.py"],  # faster first (-x)
}

# Issue 28's five hand-made mutants (file, original text, mutated text): beyond cosmic-ray's operators, each must
# fail its module's tests (``--named``).
NAMED = [
    ("lifecycle", "Stage.FOSSILIZED: frozenset(),", "Stage.FOSSILIZED: frozenset({Stage.CULLED}),"),  # table entry
    ("ops/reference", "x * (1 + alpha * torch.tanh(u))", "x * (1 + torch.tanh(alpha * u))"),  # multiplicative blend
    ("controller", "useful = s.benefit < -c.benefit_threshold", "useful = s.benefit < c.benefit_threshold"),
    ("optim", "m.copy_(torch.where(m_, self.momentum * m + g, m))", "m.copy_(self.momentum * m + g)"),  # unmasked
    ("checkpoint", "if m and int(m.group(1)) != step:", "if False and m and int(m.group(1)) != step:"),  # step check
]

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
test-command = "{test_command} -x -q -p no:cacheprovider {tests}"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = {exclude}
"""

# Imported once by the server; each mutant's fork starts with them loaded. morpho_dist must not be among them. The
# pytest plugins are listed so that each run does not import them again (with assertion rewriting, uncached).
PRELOAD = [
    "torch",
    "numpy",
    "triton",
    "hydra",
    "omegaconf",
    "pytest",
    "pdb",
    "hypothesis",
    "hypothesis.strategies",
    "_hypothesis_pytestplugin",
    "anyio.pytest_plugin",
    "hydra.extra.pytest_plugin",
    "pytest_benchmark.plugin",
]


def serve(sock_path: str, timeout: float) -> None:
    """Answer each client with the exit status of ``pytest.main(args)`` run in a fork of this process."""
    import importlib

    sys.dont_write_bytecode = True  # a mutant written in the same second as the last must not reuse its .pyc
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    assert not any(m == "morpho_dist" or m.startswith("morpho_dist.") for m in sys.modules), "morpho_dist preloaded"
    gc.freeze()  # pytest's gc.collect() calls at the end of each run then skip these modules' objects (0.7 s)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    print("ready", flush=True)
    log = sock_path + ".log"
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:  # the test run: its own cwd, output file, and a hard time limit
                server.close()
                signal.alarm(int(timeout))  # before cosmic-ray's own limit, so the next mutant never waits
                os.chdir(request["cwd"])
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(out, 1)
                os.dup2(out, 2)
                import pytest

                os._exit(int(pytest.main(request["args"])))
            _, status = os.waitpid(pid, 0)
            with open(log, errors="replace") as fh:
                tail = fh.read()[-3000:]
            reply = json.dumps({"code": os.waitstatus_to_exitcode(status), "output": tail})
            with contextlib.suppress(OSError):  # the client was killed (cosmic-ray's timeout)
                conn.sendall((reply + "\n").encode())


def client(sock_path: str, args: list[str]) -> int:
    """cosmic-ray's test command: send the pytest arguments to the server, print the end of the run's output (kept
    in the session) and exit with its status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(sock_path)
        conn.sendall((json.dumps({"cwd": os.getcwd(), "args": args}) + "\n").encode())
        line = conn.makefile("r").readline()
    reply = json.loads(line) if line.strip() else {"code": 1, "output": "no answer from the pytest server"}
    print(reply["output"])
    code = reply["code"]
    return code if 0 <= code < 256 else 1  # a signal (negative) counts as a failed run: the mutant is killed


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


def run_module(
    module: str, scratch: str, timeout: float, env: dict, test_command: str
) -> tuple[dict[str, int], list[tuple], float]:
    tests = " ".join(MODULES[module])
    name = module.replace("/", "_")
    session = os.path.join(scratch, f"{name}.sqlite")
    config = os.path.join(scratch, f"{name}.toml")
    # cosmic-ray's limit is 10 s above the server's own (which kills the test run and answers first)
    fill = {"module": module, "timeout": timeout + 10, "test_command": test_command, "tests": tests}
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


def run_named(work: str, env: dict) -> list[str]:
    """Apply each NAMED mutant to the scratch copy in turn and run its module's tests; one line per mutant."""
    lines = []
    for module, old, new in NAMED:
        path = os.path.join(work, "morpho_dist", f"{module}.py")
        with open(path) as fh:
            source = fh.read()
        if source.count(old) != 1:
            lines.append(f"{module}: {old!r} not found once: the named mutant no longer applies")
            continue
        with open(path, "w") as fh:
            fh.write(source.replace(old, new))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *MODULES[module]]
        done = subprocess.run(cmd, cwd=work, env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True)
        with open(path, "w") as fh:
            fh.write(source)
        lines.append(f"{module}: {new!r}: {'killed' if done.returncode else 'SURVIVED'}")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help=f"modules (default: all of {list(MODULES)})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    parser.add_argument("--report", help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (its sqlite sessions)")
    parser.add_argument("--no-server", action="store_true", help="a fresh python -m pytest per mutant (slower)")
    parser.add_argument("--named", action="store_true", help="only issue 28's five hand-made mutants (NAMED)")
    parser.add_argument("--server", nargs=1, metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=1, metavar="SOCKET", help=argparse.SUPPRESS)
    if "--client" in sys.argv[1:2]:  # the per-mutant test command: --client SOCKET PYTEST-ARGS...
        sys.exit(client(sys.argv[2], sys.argv[3:]))
    args = parser.parse_args()
    if args.server:
        serve(args.server[0], args.timeout)
        return
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
    if args.named:
        try:
            lines = run_named(work, env)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        sys.exit(0 if all(line.endswith(": killed") for line in lines) else 1)
    lines, total = [], {"killed": 0, "survived": 0, "incompetent": 0, "skipped": 0}
    server = None
    if args.no_server:
        test_command = f"{sys.executable} -m pytest"
    else:
        sock = os.path.join(scratch, "pytest.sock")
        cmd = [sys.executable, os.path.abspath(__file__), "--server", sock, "--timeout", str(args.timeout)]
        server = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "ready":
            sys.exit("error: the pytest server did not start")
        test_command = f"{sys.executable} {os.path.abspath(__file__)} --client {sock}"
    try:
        for module in args.modules:
            counts, survivors, seconds = run_module(module, scratch, args.timeout, env, test_command)
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
        if server is not None:
            server.terminate()
            server.wait()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"sessions kept in {scratch}")


if __name__ == "__main__":
    main()
