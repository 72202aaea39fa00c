"""Property tests of the seed lifecycle: random command sequences on a small SeededLayer.

A hypothesis state machine drives one SeededLayer (reference backend, CPU) with the commands of
``morpho_dist.commands`` (germinate, advance, cull, cancel, rollback, recycle, by global seed index, owned or not),
raw ``SeededLayer.apply_stage_changes`` batches with random targets (ids in and out of range, indices in and out of
range, duplicates), ``tick_``, alpha writes and training steps that change parameters and telemetry. Checked after
every rule:

- every observed (before, after) stage pair of every seed is unchanged or in the hand-written table of
  tests/expected.py (never the library's ``LEGAL_TRANSITIONS``);
- a command is refused (ValueError / IllegalTransition, never another exception) exactly when a model of the
  DESIGN.md table says it is illegal (owner, transition table, CULLED embargo, blend id), and a refused command
  leaves the whole state_dict (state fields, bank parameters, telemetry) bit-identical;
- an accepted command changes only its own seed, moves it to the stage the table names, and writes the side
  fields the docstrings promise (generation, germinated_at, blend, embargo_until, steps_in_stage, alpha, and on
  germination the deterministic blueprint draw of ``blueprints.initial_params``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from morpho_dist import commands
from morpho_dist.blends import BLEND_NAMES, NUM_BLENDS, blend_id
from morpho_dist.blueprints import initial_params
from morpho_dist.commands import COMMANDS
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import NUM_STAGES, STATE_FIELDS, IllegalTransition, Stage
from tests.expected import ADVANCE, COMMAND_TARGET, is_legal

# Stages whose entry resets alpha and alpha_rate (layer.SeededLayer._enter).
RESETS_ALPHA = {Stage.DORMANT, Stage.CULLED, Stage.CANCELLED, Stage.ROLLED_BACK, Stage.GERMINATED}
# Blend arguments of germinate: None (the layer default), names, ids, and bad ones.
BLEND_ARGS = st.one_of(
    st.none(),
    st.sampled_from(BLEND_NAMES),
    st.integers(-2, NUM_BLENDS + 1),
    st.sampled_from(["Linear", "", "dense", "lin"]),
)


def snapshot(layer: SeededLayer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def changed_keys(layer: SeededLayer, before: dict[str, torch.Tensor]) -> list[str]:
    after = layer.state_dict()
    assert after.keys() == before.keys()
    return [k for k, v in before.items() if not torch.equal(after[k], v)]


def expected_blend(layer: SeededLayer, blend) -> int | None:
    """The blend id germinate should store, or None when the argument must be refused."""
    if blend is None:
        return layer.default_blend
    if isinstance(blend, str):
        return blend_id(blend) if blend.lower() in BLEND_NAMES else None  # names are case-insensitive
    return blend if 0 <= blend < NUM_BLENDS else None


class LifecycleMachine(RuleBasedStateMachine):
    @initialize(
        kind=st.sampled_from(["diagonal", "lowrank"]),
        num_seeds=st.integers(1, 4),
        offset=st.integers(0, 5),
        extra=st.integers(0, 3),
        default_blend=st.sampled_from(BLEND_NAMES),
    )
    def setup(self, kind, num_seeds, offset, extra, default_blend):
        chunk = 16 if kind == "lowrank" else 3
        self.layer = SeededLayer(
            chunk * num_seeds,
            num_seeds,
            kind=kind,
            rank=2,
            blend=default_blend,
            backend="reference",
            layer_key="prop",
            seed_offset=offset,
            num_global_seeds=offset + num_seeds + extra,
        )
        self.step = 0
        self.gen = torch.Generator().manual_seed(offset * 7 + num_seeds)

    # ---- the checked move ------------------------------------------------------------------------------------
    def _attempt(self, fn, legal: bool | None, touched: set[int]):
        """Run one command. ``legal``: the model's verdict (None: the model does not decide). ``touched``: local
        indices the command may change."""
        layer = self.layer
        before = snapshot(layer)
        stages_before = layer.stages()
        try:
            fn()
        except ValueError as err:  # IllegalTransition is a ValueError
            assert changed_keys(layer, before) == [], f"refused command changed state: {err}"
            assert legal is not True, f"legal command refused: {err}"
            return None
        except Exception as err:  # pragma: no cover - a failure path
            raise AssertionError(f"command raised {type(err).__name__}, not ValueError: {err}") from err
        assert legal is not False, "illegal command was accepted"
        stages_after = layer.stages()
        for i, (src, dst) in enumerate(zip(stages_before, stages_after)):
            assert src == dst or is_legal(src.name, dst.name), f"seed {i}: {src.name} -> {dst.name} is not legal"
            if src != dst:
                event(f"{src.name} -> {dst.name}")
        after = layer.state_dict()
        for i in set(range(layer.num_seeds)) - touched:  # other seeds: every field and parameter slice untouched
            for name in (*STATE_FIELDS, "bank.p0", "bank.p1"):
                assert torch.equal(after[name][i], before[name][i]), f"{name}[{i}] changed by a command on {touched}"
        assert torch.equal(after["telemetry"], before["telemetry"]), "a lifecycle command changed telemetry"
        return before

    def _check_entered(self, i: int, dst: Stage) -> None:
        layer = self.layer
        assert layer.stages()[i] == dst
        assert int(layer.steps_in_stage[i]) == 0, "entering a stage restarts its clock"
        if dst in RESETS_ALPHA:
            assert float(layer.alpha[i]) == 0.0 and float(layer.alpha_rate[i]) == 0.0

    # ---- rules -----------------------------------------------------------------------------------------------
    @rule(
        # advance weighted up so seeds get deep into the main path; seeds mostly owned, sometimes not
        command=st.sampled_from([*COMMANDS, "advance", "advance", "advance", "explode"]),
        seed_delta=st.one_of(st.integers(0, 1), st.integers(-2, 5)),
        dt=st.integers(0, 6),
        embargo=st.integers(-3, 20),
        blend=BLEND_ARGS,
    )
    def run_command(self, command, seed_delta, dt, embargo, blend):
        layer = self.layer
        self.step += dt
        step = self.step
        seed = layer.seed_offset + seed_delta  # may fall outside this shard
        owned = commands.owns(layer, seed)
        i = seed - layer.seed_offset
        src = layer.stages()[i] if owned else None
        # The model of DESIGN.md section 3.
        if not owned or command not in COMMANDS:
            legal, dst = False, None
        elif command == "germinate":
            dst = Stage.GERMINATED
            legal = src == Stage.DORMANT and expected_blend(layer, blend) is not None
        elif command == "advance":
            dst = Stage[ADVANCE[src.name]] if src.name in ADVANCE else None
            legal = dst is not None
        else:
            dst = Stage[COMMAND_TARGET[command]]
            legal = is_legal(src.name, dst.name)
            if src == Stage.CULLED and dst == Stage.DORMANT:
                legal = legal and step >= int(layer.embargo_until[i])
        generation = int(layer.generation[i]) if owned else None

        before = self._attempt(
            lambda: commands.run_command(layer, seed, command, step, embargo_steps=embargo, blend=blend),
            legal,
            {i} if owned else set(),
        )
        if before is None:
            return
        self._check_entered(i, dst)
        if command == "germinate":
            assert int(layer.generation[i]) == generation + 1
            assert int(layer.germinated_at[i]) == step
            assert int(layer.blend[i]) == expected_blend(layer, blend)
            p0, p1 = initial_params(  # the deterministic per-(layer, seed, generation) draw, whatever came before
                layer.kind,
                layer.chunk,
                layer.bank.rank,
                int(layer.blend[i]),
                base_seed=layer.bank.base_seed,
                layer_key=layer.layer_key,
                seed_index=seed,
                generation=generation + 1,
            )
            assert torch.equal(layer.bank.p0[i], p0) and torch.equal(layer.bank.p1[i], p1)
        if command == "cull":
            assert int(layer.embargo_until[i]) == step + embargo

    @rule(
        changes=st.lists(st.tuples(st.integers(-1, 4), st.integers(-1, NUM_STAGES)), min_size=0, max_size=4),
        dt=st.integers(0, 6),
        command=st.sampled_from(["advance", "controller"]),
    )
    def apply_batch(self, changes, dt, command):
        layer = self.layer
        self.step += dt
        step = self.step
        n = layer.num_seeds
        current = layer.stages()
        indices = [i for i, _ in changes]
        if any(not 0 <= i < n for i in indices) or any(not 0 <= s < NUM_STAGES for _, s in changes):
            legal = False
        elif len(set(indices)) != len(indices):
            legal = None  # duplicate indices: see test_duplicate_index_batch_cannot_leave_a_terminal_stage
        else:
            legal = True
            for i, s in changes:
                dst = Stage(s)
                ok = is_legal(current[i].name, dst.name) and dst != Stage.GERMINATED
                if current[i] == Stage.CULLED and dst == Stage.DORMANT:
                    ok = ok and step >= int(layer.embargo_until[i])
                legal = legal and ok
        touched = {i for i in indices if 0 <= i < n}
        before = self._attempt(lambda: layer.apply_stage_changes(changes, step, command), legal, touched)
        if before is not None and legal:
            for i, s in changes:
                self._check_entered(i, Stage(s))

    @rule()
    def tick(self):
        before = snapshot(self.layer)
        stages = self.layer.stages()
        commands.tick_([self.layer])
        assert self.layer.stages() == stages
        expected = before["steps_in_stage"] + torch.tensor([s != Stage.DORMANT for s in stages], dtype=torch.int32)
        assert torch.equal(self.layer.steps_in_stage, expected)

    @rule(value=st.floats(0.0, 1.0), rate=st.floats(0.0, 0.5), index=st.integers(0, 3))
    def set_alpha(self, value, rate, index):
        """What the alpha schedules write (only alpha fields)."""
        i = index % self.layer.num_seeds
        self.layer.alpha[i] = value
        self.layer.alpha_rate[i] = rate

    @rule(index=st.integers(0, 3), moves=st.integers(1, 7), dt=st.integers(0, 3))
    def march(self, index, moves, dt):
        """Germinate (when DORMANT) then advance one owned seed several times, each move checked like any other:
        takes seeds deep into the main path, where the off-path commands have the most to refuse."""
        seed_delta = index % self.layer.num_seeds
        for _ in range(moves):
            stage = self.layer.stages()[seed_delta]
            command = "germinate" if stage == Stage.DORMANT else "advance"
            self.run_command(command, seed_delta, dt, 0, None)

    @rule(
        command=st.sampled_from(["cull", "cancel", "rollback", "recycle"]),
        index=st.integers(0, 3),
        dt=st.integers(0, 12),
        embargo=st.integers(0, 10),
    )
    def off_path(self, command, index, dt, embargo):
        """The off-main-path commands on an owned seed."""
        self.run_command(command, index % self.layer.num_seeds, dt, embargo, None)

    @rule(rows=st.integers(1, 3))
    def train_step(self, rows):
        """Forward + backward + an SGD step: moves parameters and telemetry so that refusals have state to keep."""
        layer = self.layer
        stages = layer.stages()
        layer.train()
        x = torch.randn(rows, layer.hidden, generator=self.gen)
        y = layer(x)
        (y.square().sum() + layer.rec_loss).backward()
        with torch.no_grad():
            for p in layer.bank.parameters():
                if p.grad is not None:
                    p.sub_(0.05 * p.grad + 0.01)
                    p.grad = None
        assert layer.stages() == stages

    @invariant()
    def ids_in_range(self):
        if not hasattr(self, "layer"):
            return
        assert all(0 <= s < NUM_STAGES for s in self.layer.stage.tolist())
        assert all(0 <= b < NUM_BLENDS for b in self.layer.blend.tolist())


LifecycleMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycle = LifecycleMachine.TestCase


# ---- regressions: bugs the state machine found ----------------------------------------------------------------


def _training_layer() -> SeededLayer:
    layer = SeededLayer(8, 2, kind="diagonal", blend="linear", backend="reference", layer_key="bug")
    commands.germinate(layer, 0, step=0)
    commands.advance(layer, 0, step=1)  # TRAINING
    return layer


def test_duplicate_index_batch_cannot_leave_a_terminal_stage():
    layer = _training_layer()
    before = snapshot(layer)
    with pytest.raises(IllegalTransition):
        layer.apply_stage_changes([(0, Stage.ROLLED_BACK), (0, Stage.GRAFTING)], step=2, command="controller")
    assert changed_keys(layer, before) == []


def test_cull_with_overflowing_embargo_is_refused_cleanly():
    layer = _training_layer()
    before = snapshot(layer)
    with pytest.raises(ValueError):
        commands.cull(layer, 0, step=10, embargo_steps=2**31)
    assert changed_keys(layer, before) == []


def test_germinate_with_overflowing_step_is_refused_cleanly():
    layer = SeededLayer(8, 2, kind="diagonal", blend="linear", backend="reference", layer_key="bug")
    before = snapshot(layer)
    with pytest.raises(ValueError):
        commands.germinate(layer, 0, step=2**31)
    assert changed_keys(layer, before) == []
