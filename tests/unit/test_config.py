"""Config tree: compose with overrides, schema errors at compose time, value validation naming the key."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from morpho_dist.cli import CONF_DIR, one_line
from morpho_dist.config import register_configs
from morpho_dist.config_rules import validate
from morpho_dist.errors import ConfigError

register_configs()


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


def _cfg(*overrides: str):
    return compose("config", overrides=list(overrides))


def test_defaults_compose_and_validate(hydra_ctx):
    cfg = _cfg()
    validate(cfg)
    assert cfg.model.name == "mlp" and cfg.data.name == "digits" and cfg.logger.name == "wandb"
    assert cfg.logger.mode == "offline" and cfg.sharding.mode == "data" and cfg.kernel.backend == "auto"
    assert list(cfg.seeds.targets) == list(cfg.model.seed_targets)
    assert cfg.seeds.blend == cfg.grafting.blend == "additive"
    for key in (
        "seed",
        "train.steps",
        "train.batch_size",
        "train.lr",
        "seeds.targets",
        "seeds.per_layer",
        "seeds.kind",
        "seeds.rank",
        "controller.interval",
        "kernel.backend",
        "kernel.deterministic",
        "kernel.block_rows",
        "kernel.block_cols",
        "kernel.num_warps",
    ):
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.parametrize(
    "overrides",
    [
        ["grafting=multiplicative"],
        ["grafting=linear", "schedule=performance_linked"],
        ["schedule=drift_controlled"],
        ["schedule=grad_norm_gated", "controller.interval=5", "controller.max_active=1"],
        ["sharding=data", "kernel.block_rows=32", "kernel.block_cols=64", "kernel.num_warps=8"],
        ["seeds.per_layer=1", "seeds.kind=diagonal"],
        ["seeds.per_layer=8", "seeds.kind=diagonal", "kernel.backend=reference", "kernel.deterministic=true"],
        ["model=cnn"],
        ["model=transformer", "optim=sgd", "logger=jsonl"],
        ["data=synthetic", "logger=none", "train.steps=5"],
    ],
)
def test_overrides_compose(hydra_ctx, overrides):
    cfg = _cfg(*overrides)
    validate(cfg)
    for ov in overrides:
        key, value = ov.split("=")
        if "." in key:
            assert str(OmegaConf.select(cfg, key)).lower() == value.lower()
    if "grafting=linear" in overrides:
        assert cfg.seeds.blend == "linear"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.stepz=5"], "train.stepz"),
        (["model.embedd=3"], "model.embedd"),
        (["controller.intervl=3"], "controller.intervl"),
        (["train.steps=abc"], "train.steps"),
        (["kernel.block_rows=1.5"], "kernel.block_rows"),
        (["kernel.autotune=maybe"], "kernel.autotune"),
        (["kernel.overlap=sometimes"], "kernel.overlap"),
    ],
)
def test_bad_key_or_type_fails_at_compose(hydra_ctx, overrides, key):
    with pytest.raises(Exception) as info:
        _cfg(*overrides)
    msg = one_line(info.value)
    assert key in msg and "\n" not in msg


@pytest.mark.parametrize(
    "overrides, group",
    [(["sharding=tensor"], "sharding"), (["model=mlpp"], "model"), (["logger=tensorboard"], "logger")],
)
def test_bad_group_option_lists_options(hydra_ctx, overrides, group):
    with pytest.raises(Exception) as info:
        _cfg(*overrides)
    msg = one_line(info.value)
    assert msg.startswith(f"{group}=") and "available options" in msg and "\n" not in msg
    if group == "sharding":
        assert "['data', 'hybrid', 'seed']" in msg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["kernel.block_rows=48"], "kernel.block_rows"),
        (["kernel.block_cols=100"], "kernel.block_cols"),
        (["kernel.num_warps=3"], "kernel.num_warps"),
        (["kernel.lowrank_rows=8"], "kernel.lowrank_rows"),
        (["kernel.lowrank_warps=6"], "kernel.lowrank_warps"),
        (["kernel.programs_per_sm=0"], "kernel.programs_per_sm"),
        (["kernel.lowrank_math=fma"], "kernel.lowrank_math"),
        (["train.steps=-5"], "train.steps"),
        (["train.steps=0"], "train.steps"),
        (["train.lr=0"], "train.lr"),
        (["seeds.per_layer=3"], "seeds.per_layer"),  # 3 does not divide the 32-wide embedding
        (["seeds.per_layer=4"], "seeds.per_layer"),  # chunks of 8 < 16: too small for lowrank
        (["seeds.kind=dense"], "seeds.kind"),
        (["kernel.backend=cuda"], "kernel.backend"),
        (["seeds.targets=[nope]"], "seeds.targets"),
        (["+train.foo=1"], "train.foo"),
        (["controller.interval=0"], "controller.interval"),
    ],
)
def test_bad_value_fails_validation_naming_key(hydra_ctx, overrides, key):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_seed_count_must_divide_transformer_width(hydra_ctx):
    validate(_cfg("model=transformer", "seeds.per_layer=4"))  # 64 / 4 = 16
    with pytest.raises(ConfigError, match="seeds.per_layer"):
        validate(_cfg("model=transformer", "seeds.per_layer=3"))


def test_conf_dir_is_the_repo_conf():
    assert os.path.isfile(os.path.join(CONF_DIR, "config.yaml"))
