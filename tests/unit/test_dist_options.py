"""Config tier of distribution: process-group backend, ranks sharing a GPU, the optimizer's foreach/fused options,
and the host optimizer's param groups over mixed DTensor / plain parameters."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from morpho_dist.cli import CONF_DIR
from morpho_dist.config import register_configs
from morpho_dist.config_rules import validate
from morpho_dist.distributed import resolve_backend
from morpho_dist.errors import ConfigError
from morpho_dist.optim import host_param_groups

register_configs()


def _validate(*overrides: str) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        validate(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["sharding.backend=mpi"], "sharding.backend='mpi' is not allowed; allowed values: ['auto', 'nccl', 'gloo']"),
        (["train.ranks_per_device=0"], "train.ranks_per_device=0 is not allowed; it must be a finite number >= 1"),
        (["sharding.backend=nccl", "train.device=cpu"], "allowed values with a CPU or a shared GPU: ['auto', 'gloo']"),
        (["sharding.backend=nccl", "train.ranks_per_device=2"], "sharding.backend='nccl' needs train.device=cuda"),
        (["optim=sgd", "optim.fused=true"], "optim.fused=true works with optim.name in ['adamw', 'adam']"),
        (["optim.fused=true", "optim.foreach=true"], "optim.foreach unset or false"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        _validate(*overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_good_values_validate():
    _validate("sharding.backend=gloo", "train.device=cuda", "train.ranks_per_device=2", "optim.foreach=false")
    _validate("sharding=seed", "optim.fused=true")


@pytest.mark.parametrize(
    "choice, device, per_device, want",
    [
        ("auto", "cpu", 1, "gloo"),
        ("auto", "cuda", 1, "nccl"),
        ("auto", "cuda", 2, "gloo"),  # NCCL refuses two ranks on one GPU
        ("gloo", "cuda", 1, "gloo"),
        ("gloo", "cpu", 1, "gloo"),
        ("nccl", "cuda", 1, "nccl"),
    ],
)
def test_backend_resolution(choice, device, per_device, want):
    assert resolve_backend(choice, torch.device(device), per_device) == want


def test_nccl_on_a_shared_gpu_is_refused():
    with pytest.raises(ValueError, match=r"sharding.backend='nccl' needs train.device=cuda"):
        resolve_backend("nccl", torch.device("cuda", 0), 2)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_param_groups_separate_dtensors_from_plain_tensors(one_rank_group):
    mesh = one_rank_group
    col = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    row = torch.nn.Parameter(distribute_tensor(torch.randn(3, 4), mesh, [Shard(1)]))
    rep = torch.nn.Parameter(distribute_tensor(torch.randn(3), mesh, [Replicate()]))
    plain = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 2))]
    groups = host_param_groups([plain[0], col, row, plain[1], rep], lr=0.5)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(plain[0]), id(plain[1])], [id(col), id(row), id(rep)]]
    assert all(g["lr"] == 0.5 for g in groups)
    # torch's multi-tensor AdamW steps both groups (one group holding both kinds raises)
    for p in [col, row, rep, *plain]:
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(groups, lr=0.1, foreach=True).step()
    mixed = torch.optim.AdamW([col, plain[0]], lr=0.1, foreach=True)
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        mixed.step()


# ---- tensor-parallel plans of seed sharding (no process group needed) ------------------------------------------
def _wrapped(model, targets, per_layer=2):
    from types import SimpleNamespace

    from morpho_dist.wrap import wrap

    seeds = SimpleNamespace(targets=targets, per_layer=per_layer, kind="diagonal")
    return wrap(model, seeds, backend="reference")


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def test_llama_plan_comes_from_its_config_under_the_base_model_prefix():
    from morpho_dist.sharding import tp_plan

    plan = tp_plan(
        _wrapped(_tiny_llama(), ["mlp.up_proj"]), ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    )
    assert plan.source == "LlamaForCausalLM.config.base_model_tp_plan"
    want = {}
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            want[f"model.layers.{i}.{name}"] = "colwise"
        want[f"model.layers.{i}.self_attn.o_proj"] = want[f"model.layers.{i}.mlp.down_proj"] = "rowwise"
    assert plan.tp == want  # lm_head (the CausalLM's own _tp_plan, a gathered output) is not part of it


def test_a_user_plan_wins_and_wildcards_match_one_name_component():
    from morpho_dist.models import MLP
    from morpho_dist.sharding import tp_plan

    model = _wrapped(MLP(8, 3, 32, [16, 16]), ["embed"])
    assert tp_plan(model, ["embed"]).tp == {"embed": "colwise", "fc1": "rowwise"}  # the built-in host's plan
    plan = tp_plan(model, ["embed"], {"embed": "colwise", "fc*": "rowwise"})
    assert plan.tp == {"embed": "colwise", "fc1": "rowwise", "fc2": "rowwise"} and plan.source == "sharding.tp_plan"
    llama = _wrapped(_tiny_llama(), ["mlp.up_proj"])
    user = {"model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.gate_proj": "colwise"}
    user["model.layers.*.mlp.down_proj"] = "rowwise"
    assert len(tp_plan(llama, ["model.layers.0.mlp.up_proj"], user).tp) == 6  # attention left replicated


@pytest.mark.parametrize(
    "plan, needle",
    [
        ({"embed": "colwise_rep"}, "'embed' -> 'colwise_rep' is not a supported tensor-parallel style; allowed values"),
        ({"embed": "colwise", "nope.*": "rowwise"}, "sharding.tp_plan: 'nope.*' matches no Linear module"),
        ({"embed": "rowwise", "fc1": "colwise"}, "seeds.targets: 'embed' is 'rowwise' in sharding.tp_plan"),
        ({"fc1": "colwise"}, "seeds.targets: 'embed' is 'not in' in sharding.tp_plan"),
    ],
)
def test_bad_plans_are_one_line_errors(plan, needle):
    from morpho_dist.models import MLP
    from morpho_dist.sharding import tp_plan

    with pytest.raises(ValueError) as err:
        tp_plan(_wrapped(MLP(8, 3, 32, [16, 16]), ["embed"]), ["embed"], plan)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_tp_plan_style_in_config():
    with pytest.raises(ConfigError, match=r"sharding.tp_plan.fc1='diagonal' is not allowed; allowed values"):
        _validate("sharding=seed", "+sharding.tp_plan={embed: colwise, fc1: diagonal}")


def test_wrapped_seed_buffers_are_kept_out_of_ddp_buffer_broadcasts():
    from morpho_dist.models import MLP

    model = _wrapped(MLP(8, 3, 32, [16]), ["embed", "fc1"], per_layer=2)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert {"embed.seeded.telemetry", "fc1.seeded.telemetry", "embed.seeded.stage"} <= ignored
    assert not any(".bank." in n for n in ignored)  # the banks' gradients are still averaged by DDP


@pytest.mark.parametrize("options", [{"foreach": True}, {"fused": True}, {"foreach": False}])
def test_capturable_host_step_over_dtensor_groups_equals_the_plain_step(one_rank_group, monkeypatch, options):
    """The CUDA default of make_optimizers (capturable AdamW: step counters on the device, 0-d tensors beside the
    DTensor state in the foreach math), run on the CPU by listing it among torch's capturable devices."""
    import importlib

    for name in ("torch.optim.adam", "torch.optim.adamw"):  # AdamW's own module in older torch
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        real = getattr(module, "_get_capturable_supported_devices", None)
        if real is not None:
            monkeypatch.setattr(
                module, "_get_capturable_supported_devices", lambda *a, f=real, **k: [*f(*a, **k), "cpu"]
            )
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(4, 3, generator=gen), torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(v.shape, generator=gen) for v in values]
    mesh = one_rank_group
    mixed = [
        torch.nn.Parameter(distribute_tensor(values[0].clone(), mesh, [Shard(0)])),
        torch.nn.Parameter(distribute_tensor(values[1].clone(), mesh, [Shard(1)])),
        torch.nn.Parameter(values[2].clone()),
    ]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    opt = torch.optim.AdamW(host_param_groups(mixed), lr=0.1, weight_decay=0.01, capturable=True, **options)
    ref = torch.optim.AdamW(plain, lr=0.1, weight_decay=0.01, capturable=True, **options)  # one plain group
    for _ in range(3):
        for p, q, g in zip(mixed, plain, grads):
            p.grad = distribute_tensor(g, mesh, p.placements) if hasattr(p, "placements") else g.clone()
            q.grad = g.clone()
        opt.step()
        ref.step()
    for p, q in zip(mixed, plain):
        local = p.to_local() if hasattr(p, "to_local") else p
        torch.testing.assert_close(local.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_host_clipping_equals_torch_clip_grad_norm_in_one_process():
    from morpho_dist.distributed import Mesh
    from morpho_dist.sharding import clip_host_grad_norm_

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]
    grads = [torch.randn(p.shape, generator=gen) * 3 for p in params]
    want = [g.clone() for g in grads]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    factor = min(1.0, 0.5 / (float(norm) + 1e-6))
    for p, g in zip(params, grads):
        p.grad = g
    got = clip_host_grad_norm_([("a", params[0]), ("b", params[1])], 0.5, Mesh(mode="data", dp=1))
    assert abs(float(got) - float(norm)) <= 1e-5 * float(norm)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w * factor)
    assert abs(float(torch.cat([p.grad.flatten() for p in params]).norm()) - 0.5) < 1e-5
