"""A model the project does not ship: wrap it by target names, grow it while training, export it, and the plain
export gives the wrapped model's eval outputs."""

from types import SimpleNamespace

import torch
from torch import nn

from morpho_dist import commands
from morpho_dist.lifecycle import Stage
from morpho_dist.schedules import ScheduleConfig, make_schedule
from morpho_dist.wrap import export, seeded_layers, wrap


class TinyAudioNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frontend = nn.Conv1d(2, 16, kernel_size=3, padding=1)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):  # x: [B, 2, L]
        h = torch.relu(self.frontend(x)).mean(-1)
        return self.head(self.body(h))


def test_wrap_train_grow_export_matches_eval():
    torch.manual_seed(0)
    model = TinyAudioNet()
    seeds_cfg = SimpleNamespace(
        targets=["body.0", "body.2"], exclude=[], per_layer=2, kind="lowrank", rank=4, act="relu",
        blend="additive", dead_eps=1e-6,
    )  # fmt: skip
    wrap(model, seeds_cfg, backend="reference", base_seed=0)
    layers = seeded_layers(model)
    assert list(layers) == ["body.0", "body.2"]
    schedule = make_schedule(ScheduleConfig(name="fixed_ramp", ramp_steps=5))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, target = torch.randn(64, 2, 10), torch.randint(0, 4, (64,))
    # seed 1 of body.0 goes all the way; seed 0 of body.2 is culled on the way
    plan = {2: ("germinate", 1, 0), 3: ("advance", 1, 0), 30: ("advance", 1, 0), 4: ("germinate", 0, 1),
            5: ("advance", 0, 1), 7: ("cull", 0, 1)}  # fmt: skip
    grafting_done = False
    losses = []
    for step in range(80):
        if step in plan:
            cmd, seed, li = plan[step]
            planned = list(layers.values())[li]
            commands.run_command(planned, seed, cmd, step)
            if commands.seed_stage(planned, seed) == Stage.GRAFTING:
                planned.alpha_rate[commands.local_index(planned, seed)] = schedule.initial_rate()
        layer = layers["body.0"]
        stage = commands.seed_stage(layer, 1)
        if stage == Stage.GRAFTING and float(layer.alpha[1]) >= 1.0 and not grafting_done:
            for _ in range(4):  # STABILIZATION -> EVALUATING -> FINE_TUNING -> FOSSILIZED
                commands.advance(layer, 1, step)
            grafting_done = True
        loss = nn.functional.cross_entropy(model(x), target)
        loss = loss + sum(sl.rec_loss for sl in layers.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        for sl in layers.values():
            schedule.step_(sl)
        commands.tick_(layers)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert commands.seed_stage(layers["body.0"], 1) == Stage.FOSSILIZED
    assert commands.seed_stage(layers["body.2"], 0) == Stage.CULLED
    assert float(layers["body.0"].bank.p1[1].abs().sum()) > 0  # the blueprint trained (B starts at zero)
    model.eval()
    xe = torch.randn(16, 2, 10)
    with torch.no_grad():
        want = model(xe)
        plain = export(model)
        got = plain(xe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not seeded_layers(plain)
    with torch.no_grad():  # the grown seed matters: with its alpha at 0 the outputs differ
        layers["body.0"].alpha[1] = 0.0
        assert (model(xe) - got).abs().max() > 1e-3
