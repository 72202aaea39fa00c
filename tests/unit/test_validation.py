"""Bad input to the seeded op raises ValueError naming the argument and the allowed values, on every backend,
before any work is done (the telemetry buffer is left unchanged)."""

import re

import pytest
import torch

from morpho_dist.kernels.options import KernelOptions
from morpho_dist.ops import resolve_backend, seeded
from morpho_dist.ops.validation import check_seeded_args

N = 4


def base_args(kind: str) -> dict:
    """A valid call: lowrank H=64 (C=16, R=4) or diagonal H=12 (C=3)."""
    g = torch.Generator().manual_seed(0)
    h = 64 if kind == "lowrank" else 12
    c = h // N
    if kind == "lowrank":
        p0, p1 = torch.randn(N, c, 4, generator=g), torch.randn(N, 4, c, generator=g)
    else:
        p0, p1 = torch.randn(N, c, generator=g), torch.randn(N, c, generator=g)
    return dict(
        x=torch.randn(2, 3, h, generator=g),
        stage=torch.tensor([0, 2, 3, 7], dtype=torch.int8),
        blend=torch.tensor([0, 1, 2, 0], dtype=torch.int8),
        alpha=torch.tensor([0.0, 0.0, 0.5, 1.0]),
        p0=p0,
        p1=p1,
        telemetry=torch.arange(N * 8, dtype=torch.float32).view(N, 8),
        kind=kind,
        act="relu",
        dead_eps=1e-6,
    )


def call(args: dict, backend: str):
    a = dict(args)
    pos = [a.pop(k) for k in ("x", "stage", "blend", "alpha", "p0", "p1", "telemetry")]
    return seeded(*pos, backend=backend, **a)


def _set(**changes):
    return lambda a: a.update(changes)


def _meta(name):
    return lambda a: a.update({name: a[name].to("meta")})


# (id, kinds it applies to, mutation, patterns that must all appear in the message: argument, allowed values)
CASES = [
    # H not divisible by N
    (
        "h_not_divisible_lowrank",
        ["lowrank"],
        _set(x=torch.randn(2, 66)),
        ["H=66", "N=4", r"divisors of H: \[1, 2, 3, 6,"],
    ),
    (
        "h_not_divisible_diag",
        ["diagonal"],
        _set(x=torch.randn(5, 10)),
        ["H=10", "N=4", r"divisors of H: \[1, 2, 5, 10\]"],
    ),
    # lowrank with C < 16
    (
        "lowrank_small_chunk",
        ["lowrank"],
        _set(x=torch.randn(3, 32), p0=torch.randn(N, 8, 4), p1=torch.randn(N, 4, 8)),
        ["kind='lowrank'", "C=8", ">= 16", "diagonal"],
    ),
    # mismatched shapes
    ("alpha_shape", None, _set(alpha=torch.zeros(N + 1)), ["alpha", r"\[N\]=\[4\]"]),
    ("blend_shape", None, _set(blend=torch.zeros(N - 1, dtype=torch.int8)), ["blend", r"\[N\]=\[4\]"]),
    ("stage_ndim", None, _set(stage=torch.zeros(2, 2, dtype=torch.int8)), ["stage", "1 dims"]),
    ("alpha_ndim", None, _set(alpha=torch.zeros(N, 1)), ["alpha", "1 dims"]),
    ("stage_empty", None, _set(stage=torch.zeros(0, dtype=torch.int8)), ["stage", "at least one seed"]),
    ("x_empty", None, _set(x=torch.randn(0, 64)), ["x", r"\[\.\.\., H\]"]),
    ("x_not_tensor", None, _set(x=[[1.0] * 64]), ["x must be a torch.Tensor"]),
    ("lowrank_p0_shape", ["lowrank"], _set(p0=torch.randn(N, 16)), ["p0", r"\[N, C, R\] = \[4, 16, R\]"]),
    ("lowrank_p0_seeds", ["lowrank"], _set(p0=torch.randn(N + 1, 16, 4)), ["p0", r"\[4, 16, R\]"]),
    ("lowrank_p1_shape", ["lowrank"], _set(p1=torch.randn(N, 4, 8)), ["p1", r"\[N, R, C\] = \[4, 4, 16\]"]),
    ("lowrank_p1_rank", ["lowrank"], _set(p1=torch.randn(N, 5, 16)), ["p1", r"\[4, 4, 16\]"]),
    ("diag_p0_shape", ["diagonal"], _set(p0=torch.randn(N, 2)), ["p0", r"\[N, C\] = \[4, 3\]"]),
    ("diag_p1_shape", ["diagonal"], _set(p1=torch.randn(N, 3, 1)), ["p1", r"\[N, C\] = \[4, 3\]"]),
    # dtypes
    ("x_int", None, _set(x=torch.ones(2, 64, dtype=torch.int32)), ["x", "int32", "float32", "bfloat16", "float16"]),
    ("stage_float", None, _set(stage=torch.zeros(N)), ["stage", "integer"]),
    ("blend_bool", None, _set(blend=torch.zeros(N, dtype=torch.bool)), ["blend", "integer"]),
    ("alpha_half", None, _set(alpha=torch.zeros(N, dtype=torch.float16)), ["alpha", "float32"]),
    ("alpha_int", None, _set(alpha=torch.zeros(N, dtype=torch.int32)), ["alpha", "float32"]),
    ("p0_p1_mixed", None, lambda a: a.update(p1=a["p1"].half()), ["p0 and p1", "float32", "float16", "bfloat16"]),
    ("params_int", None, lambda a: a.update(p0=a["p0"].int(), p1=a["p1"].int()), ["p0 and p1", "float32"]),
    (
        "telemetry_f64",
        None,
        lambda a: a.update(telemetry=a["telemetry"].double()),
        ["telemetry", "float32", r"\[4, 8\]"],
    ),
    ("telemetry_bf16", None, lambda a: a.update(telemetry=a["telemetry"].bfloat16()), ["telemetry", "float32"]),
    # telemetry of the wrong shape
    ("telemetry_fields", None, _set(telemetry=torch.zeros(N, 7)), ["telemetry", r"\[N, 8\] = \[4, 8\]"]),
    ("telemetry_seeds", None, _set(telemetry=torch.zeros(N + 1, 8)), ["telemetry", r"\[4, 8\]"]),
    ("telemetry_flat", None, _set(telemetry=torch.zeros(N * 8)), ["telemetry", "2 dims"]),
    # devices: 'meta' tensors make a mismatch without a GPU
    ("p0_meta", None, _meta("p0"), ["p0 is on meta", "x is on cpu", "share x's device"]),
    ("p1_meta", None, _meta("p1"), ["p1 is on meta", "x is on cpu"]),
    ("alpha_meta", None, _meta("alpha"), ["alpha is on meta", "x is on cpu"]),
    ("stage_meta", None, _meta("stage"), ["stage is on meta", "x is on cpu"]),
    ("blend_meta", None, _meta("blend"), ["blend is on meta", "x is on cpu"]),
    ("telemetry_meta", None, _meta("telemetry"), ["telemetry is on meta", "x is on cpu"]),
    ("x_meta", None, _meta("x"), ["is on cpu but x is on meta"]),
    # ids out of range
    (
        "stage_id_high",
        None,
        _set(stage=torch.tensor([0, 11, 3, 7], dtype=torch.int8)),
        ["stage", r"\[11\]", r"0\.\.10"],
    ),
    (
        "stage_id_neg",
        None,
        _set(stage=torch.tensor([-1, 2, 3, -1], dtype=torch.int8)),
        ["stage", r"\[-1\]", r"0\.\.10"],
    ),
    (
        "blend_id_high",
        None,
        _set(blend=torch.tensor([0, 3, 2, 5], dtype=torch.int8)),
        ["blend", r"\[3, 5\]", r"0\.\.2"],
    ),
    ("blend_id_neg", None, _set(blend=torch.tensor([0, 1, -2, 0], dtype=torch.int64)), ["blend", r"\[-2\]", r"0\.\.2"]),
    # kind, act, dead_eps
    ("bad_kind", None, _set(kind="dense"), ["kind='dense'", r"\['lowrank', 'diagonal'\]"]),
    ("bad_act", None, _set(act="tanh"), ["act='tanh'", r"\['relu', 'gelu_tanh'\]"]),
    ("neg_dead_eps", None, _set(dead_eps=-1.0), ["dead_eps", ">= 0"]),
    ("nan_dead_eps", None, _set(dead_eps=float("nan")), ["dead_eps", ">= 0"]),
]

BACKENDS = ["reference", "triton"]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # backend='triton' on CPU tensors is allowed under Triton's interpreter; arguments are validated before launch.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _cases():
    for kind in ("lowrank", "diagonal"):
        for cid, kinds, mutate, patterns in CASES:
            if kinds is None or kind in kinds:
                yield pytest.param(kind, mutate, patterns, id=f"{kind}-{cid}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "mutate", "patterns"), list(_cases()))
def test_bad_input_raises_value_error(backend, kind, mutate, patterns):
    args = base_args(kind)
    saved = args["telemetry"].clone()
    buffer = args["telemetry"]
    mutate(args)
    with pytest.raises(ValueError) as info:
        call(args, backend)
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in message: {msg}"
    # A refused call changes nothing.
    assert torch.equal(buffer, saved)


@pytest.mark.parametrize("kind", ["lowrank", "diagonal"])
def test_base_args_are_valid(kind):
    """The cases above differ from a valid call only by their mutation."""
    args = base_args(kind)
    pos = [args.pop(k) for k in ("x", "stage", "blend", "alpha", "p0", "p1", "telemetry")]
    shp = check_seeded_args(*pos, **args)
    assert (shp.rows, shp.seeds) == (6, N)
    y, rec = call(base_args(kind), "reference")
    assert y.shape == (2, 3, 64 if kind == "lowrank" else 12) and rec.dim() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_only_on_reference(backend):
    args = base_args("diagonal")
    for k in ("x", "p0", "p1", "alpha"):
        args[k] = args[k].double()
    if backend == "reference":
        y, _ = call(args, backend)
        assert y.dtype == torch.float64
    else:
        with pytest.raises(ValueError, match=r"x has dtype torch.float64; allowed dtypes: \['float32', 'bfloat16'"):
            call(args, backend)


def test_triton_refuses_x_past_int32_indexing():
    args = base_args("diagonal")
    hidden = args["x"].shape[-1]
    args["x"] = args["x"][:1, :1].expand(2**31 // hidden + 1, 1, hidden)  # an expanded view: no memory
    with pytest.raises(ValueError, match=r"x has \d+ elements; backend='triton' takes at most 2147483647"):
        call(args, "triton")


def test_check_ids_refused_inside_a_graph_capture(monkeypatch):
    """Inside a CUDA graph capture, check_ids=True (a host read) is refused by name; check_ids=False passes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    args = base_args("lowrank")
    with pytest.raises(ValueError, match=r"check_ids=True .* capture .* allowed inside a capture: check_ids=False"):
        check_seeded_args(**args)
    assert check_seeded_args(**args, check_ids=False).seeds == N


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", "torch"])
def test_bad_backend_name(bad):
    with pytest.raises(ValueError, match=r"allowed values: \['triton', 'reference', 'auto'\]") as info:
        call(base_args("diagonal"), bad)
    assert repr(bad) in str(info.value)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("reference", cpu) == "reference"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("triton", cpu) == "triton"  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors.*\['reference', 'auto'\]"):
        resolve_backend("triton", cpu)


# ---- KernelOptions ---------------------------------------------------------------------------------------------


def test_kernel_options_defaults_are_valid():
    o = KernelOptions()
    assert (o.block_rows, o.block_cols, o.num_warps, o.deterministic, o.autotune) == (8, 0, 2, False, False)
    assert (o.lowrank_rows, o.lowrank_warps) == (128, 4)
    KernelOptions(block_rows=1, block_cols=16, num_warps=1, deterministic=True, dot_precision="tf32", autotune=True)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"block_rows": 48}, r"kernel\.block_rows must be a power of two, got 48"),
        ({"block_rows": 0}, r"kernel\.block_rows must be a power of two"),
        ({"block_rows": 64.0}, r"kernel\.block_rows must be a power of two"),
        ({"lowrank_rows": 8}, r"kernel\.lowrank_rows must be >= 16"),
        ({"lowrank_warps": 6}, r"kernel\.lowrank_warps must be a power of two, got 6"),
        ({"autotune": "yes"}, r"kernel\.autotune must be a boolean \(true or false\), got 'yes'"),
        ({"overlap": 1}, r"kernel\.overlap must be a boolean \(true or false\), got 1"),
        ({"block_cols": 100}, r"kernel\.block_cols must be a power of two \(or 0 for auto\), got 100"),
        ({"block_cols": -128}, r"kernel\.block_cols must be a power of two"),
        ({"num_warps": 3}, r"kernel\.num_warps must be a power of two, got 3"),
        ({"num_warps": 64}, r"kernel\.num_warps must be one of \[1, 2, 4, 8, 16, 32\]"),
        ({"dot_precision": "tf32x3"}, r"kernel\.dot_precision must be one of \['ieee', 'tf32'\]"),
        ({"lowrank_math": "fma"}, r"kernel\.lowrank_math must be one of \['auto', 'dots', 'rank1'\], got 'fma'"),
    ],
)
def test_kernel_options_reject_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        KernelOptions(**kwargs)
