"""Property tests of the config front door: random Hydra overrides either compose and pass validation, or stop
with exit code 2 and ONE line naming the offending key.

The CLI (``morpho_dist.cli.main``) composes and validates through ``cli._precheck(overrides)`` before the Hydra
app runs: it returns the composed config, or prints ``error: <one line>`` to stderr and exits with code 2. The
properties call that same function in-process (a subprocess per example would take ~1.4 s); one subprocess test
checks the real command line on three fixed bad overrides.

Overrides are drawn from the stable keys of DESIGN.md section 5 (train.steps, train.batch_size, train.lr,
seeds.per_layer, seeds.kind, seeds.rank, controller.interval, kernel.block_rows, kernel.block_cols,
kernel.num_warps, kernel.backend, kernel.deterministic), the group choices model=, data=, grafting=, schedule=,
sharding=, logger= (real options and made-up ones), made-up keys (plain, ``+``, ``++``, ``~``) and values from
good ones to garbage (wrong types, interpolations, lists, dicts, sweeps, random text).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from morpho_dist import cli
from morpho_dist.config_rules import validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INT_KEYS = (
    "train.steps",
    "train.batch_size",
    "seeds.per_layer",
    "seeds.rank",
    "controller.interval",
    "kernel.block_rows",
    "kernel.block_cols",
    "kernel.num_warps",
)
GROUPS = {
    "model": ("mlp", "mlp_wide", "cnn", "transformer"),
    "data": ("digits", "synthetic", "cifar10"),
    "grafting": ("additive", "multiplicative", "linear"),
    "schedule": ("fixed_ramp", "performance_linked", "drift_controlled", "grad_norm_gated"),
    "sharding": ("data", "seed", "hybrid"),
    "logger": ("wandb", "jsonl", "none"),
}
UNKNOWN_KEYS = ("train.stepz", "kernel.blockrows", "model.embedd", "seedz.kind", "controller.intervl", "foo", "trian")
# Values Hydra's override grammar accepts but no key here wants (or only some do).
GARBAGE = (
    "abc",
    "1.5",
    "-3",
    "0",
    "",
    "null",
    "true",
    "[1,2]",
    "[]",
    "{a:1}",
    "${train.steps}",
    "${kernel.block_rows}",
    "${oops}",
    "${oc.env:MORPHO_PROP_NOPE}",
    "'quoted'",
    "0x10",
    "1e309",
    "nan",
    "-inf",
    "2147483648",
    "1,2",
    "choice(1,2)",
    "a b",
)
TEXT = st.text(alphabet="abz019 .,:=-+_'\"[]{}()$@%\\/é", max_size=6)


def pow2_or_near():
    return st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256]), st.integers(-3, 300))


def key_value():
    """(key, value) for one of the stable scalar keys: mostly plausible values, sometimes garbage."""
    good = st.one_of(
        st.tuples(st.sampled_from(INT_KEYS), pow2_or_near().map(str)),
        st.tuples(st.just("train.lr"), st.sampled_from(["0.003", "1e-3", "0", "-0.1", "1", "inf", "nan", "3"])),
        st.tuples(st.just("seeds.kind"), st.sampled_from(["lowrank", "diagonal", "dense", "LOWRANK"])),
        st.tuples(st.just("kernel.backend"), st.sampled_from(["auto", "triton", "reference", "cuda", "Triton"])),
        st.tuples(st.just("kernel.deterministic"), st.sampled_from(["true", "false", "True", "yes", "1", "maybe"])),
    )
    keys = st.sampled_from((*INT_KEYS, "train.lr", "seeds.kind", "kernel.backend", "kernel.deterministic"))
    garbage = st.tuples(keys, st.one_of(st.sampled_from(GARBAGE), TEXT))
    return st.one_of(good, good, garbage)


def override():
    scalar = key_value().map(lambda kv: f"{kv[0]}={kv[1]}")
    group = st.sampled_from(sorted(GROUPS)).flatmap(
        lambda g: st.one_of(
            st.sampled_from(GROUPS[g]),
            st.sampled_from(["resnet", "MLP", "", "data", "default", "null", "7", "[mlp,cnn]"]),
            TEXT,
        ).map(lambda v, g=g: f"{g}={v}")
    )
    unknown = st.tuples(
        st.sampled_from(["", "+", "++"]), st.sampled_from(UNKNOWN_KEYS), st.sampled_from(["1", "abc", "null"])
    ).map(lambda t: f"{t[0]}{t[1]}={t[2]}")
    deletion = st.sampled_from(["~kernel.block_rows", "~train", "~model", "~seeds.kind"])
    return st.one_of(scalar, scalar, group, unknown, deletion)


def precheck(overrides: list[str]):
    """cli._precheck in-process: (cfg, None, stdout, stderr) or (None, exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cfg = cli._precheck(overrides)
        except SystemExit as exc:
            return None, exc.code, out.getvalue(), err.getvalue()
    return cfg, None, out.getvalue(), err.getvalue()


def key_of(ov: str) -> str:
    return ov.split("=", 1)[0].lstrip("+~")


def names_key(line: str, key: str) -> bool:
    """The line names the key or one of its dotted parents as a whole word (``train.steps.x=1`` may be reported
    as ``train.steps``, ``seedz.kind=1`` as ``seedz``)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        name = re.escape(".".join(parts[:i]))
        if re.search(rf"(?<![\w.]){name}(?![\w.])", line):
            return True
    return False


_PARSER = OverridesParser.create()


def well_formed(ov: str) -> bool:
    """Hydra's grammar parses the override, and a group override's value is a plain option name."""
    try:
        (parsed,) = _PARSER.parse_overrides([ov])
    except Exception:
        return False
    if key_of(ov) in GROUPS:
        value = parsed.value()
        return isinstance(value, str) and "${" not in value
    return True


def assert_one_line_error(code, out: str, err: str) -> str:
    assert code == cli.EXIT_CONFIG, f"exit code {code!r}"
    assert out == "", f"stdout: {out!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), lines[0]
    return lines[0]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(override(), min_size=1, max_size=3).filter(lambda ovs: all(map(well_formed, ovs))))
def test_overrides_compose_and_validate_or_fail_with_one_line_naming_the_key(overrides):
    cfg, code, out, err = precheck(overrides)
    if cfg is not None:
        event("composed and validated")
        assert code is None and out == "" and err == ""
        validate(cfg)  # what the app will see passes validation (again)
        last = {key_of(ov): ov.split("=", 1)[1] for ov in overrides if not ov.startswith("~")}
        for key, value in last.items():  # plain integer overrides landed where they were aimed
            if key in INT_KEYS and re.fullmatch(r"-?\d+", value):
                assert OmegaConf.select(cfg, key) == int(value), key
        return
    line = assert_one_line_error(code, out, err)
    event("refused")
    note(line)
    keys = [key_of(ov) for ov in overrides]
    assert any(names_key(line, key) for key in keys), f"{line!r} names none of {keys}"


MALFORMED = (
    "train.steps=[1,2",
    "train.steps=${}",
    "seeds.kind=a=b",
    "train.steps=é",
    "train.steps",
    "+train.foo",
    "=5",
    "model=null",
    "data=7",
    "logger=${oops}",
    "sharding=[data",
)


def malformed():
    """One override that Hydra's grammar rejects, or a group given null, a number or an interpolation."""
    keys = st.sampled_from((*INT_KEYS, "train.lr", "seeds.kind", *GROUPS))
    made = st.tuples(keys, TEXT).map(lambda kv: f"{kv[0]}={kv[1]}").filter(lambda ov: not well_formed(ov))
    return st.one_of(st.sampled_from(MALFORMED), made)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    overrides=st.tuples(st.lists(override(), max_size=2), malformed(), st.integers(0, 2)).map(
        lambda t: [*t[0][: t[2]], t[1], *t[0][t[2] :]]
    )
)
def test_malformed_overrides_fail_with_one_line(overrides):
    """Overrides Hydra's grammar rejects (or a group given null, a number or an interpolation): still exit 2 and
    one line, no traceback."""
    cfg, code, out, err = precheck(overrides)
    assert cfg is None, "a malformed override composed"
    assert_one_line_error(code, out, err)


@pytest.mark.parametrize("override", ["train.steps=[1,2", "seeds.kind=a=b", "model=null", "data=${oops}"])
def test_malformed_override_errors_name_the_key(override):
    cfg, code, out, err = precheck([override])
    line = assert_one_line_error(code, out, err)
    assert key_of(override) in line


# ---- the real command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    ["kernel.blockrows=32", "schedule=exponential", "train.lr=-1"],  # unknown key, unknown option, bad value
)
def test_cli_bad_override_exits_with_one_line(override):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["WANDB_MODE"] = "offline"
    res = subprocess.run(
        [sys.executable, "-m", "morpho_dist.train", override],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert res.returncode != 0
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert key_of(override) in lines[0]
