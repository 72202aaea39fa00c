"""The transformers Trainer integration runs a short fit on the CPU (a tiny Llama, random init): the seeds grow to
FOSSILIZED, the Trainer's optimizer holds no bank, and a run resumed from a checkpoint continues the engine."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from morpho_dist import Morphogenesis  # noqa: E402
from morpho_dist.integrations.hf_trainer import ENGINE_FILE, MorphoTrainer  # noqa: E402
from tests.fast_growth import FAST_CONTROLLER, rule_tokens  # noqa: E402

SEEDS = {"targets": ["mlp.up_proj"], "per_layer": 2, "kind": "diagonal"}


def sequences(rows: int, seed: int) -> list[dict]:
    ids = rule_tokens(rows, 12, 32, torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


VAL = torch.stack([r["input_ids"] for r in sequences(32, 9)])


@torch.no_grad()
def val_loss(model) -> float:
    model.eval()
    out = float(model(input_ids=VAL, labels=VAL).loss)
    model.train()
    return out


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=12,
    )
    return transformers.LlamaForCausalLM(cfg)


def trainer_for(model, out_dir, steps):
    morph = Morphogenesis(model, seeds=SEEDS, controller=FAST_CONTROLLER, schedule={"ramp_steps": 5})
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        save_steps=30,
        save_strategy="steps",
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = MorphoTrainer(morph=morph, evaluate=val_loss, model=model, args=args, train_dataset=sequences(512, 1))
    return trainer, morph


def test_trainer_grows_the_model_and_resumes(tmp_path):
    trainer, morph = trainer_for(llama(), tmp_path, 60)
    trainer.train()
    assert morph.steps == 60
    banks = {id(p) for layer in morph.layers.values() for p in layer.bank.parameters()}
    assert not any(id(p) in banks for g in trainer.optimizer.param_groups for p in g["params"])
    fossil = [e for e in morph.events if e["to"] == "FOSSILIZED"]
    assert fossil and fossil[0]["reason"].startswith("val loss improvement"), morph.events
    assert (tmp_path / "checkpoint-60" / ENGINE_FILE).is_file()

    again, morph2 = trainer_for(llama(), tmp_path, 70)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-60"))
    assert morph2.steps == 70
    layer, seed = morph2.layers[fossil[0]["layer"]], fossil[0]["seed"]
    assert int(layer.stage[seed]) == 7  # FOSSILIZED, from the checkpoint
