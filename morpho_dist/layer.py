"""SeededLayer: a thin module holding one layer's seed state, blueprint bank and telemetry; forward calls the op."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from morpho_dist.blends import BLEND_NAMES, NUM_BLENDS, blend_id
from morpho_dist.blueprints import BlueprintBank, check_act, check_kind
from morpho_dist.kernels.layout import NUM_FIELDS
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.lifecycle import STATE_FIELDS, IllegalTransition, SeedState, Stage, all_idle, check_transition
from morpho_dist.ops import check_backend, promises
from morpho_dist.ops.prepared import SeededCalls

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def with_rec_losses(loss: torch.Tensor, layers: Iterable[SeededLayer], weight: float) -> torch.Tensor:
    """``loss`` plus ``weight`` times every layer's reconstruction loss of its last forward (train.rec_weight).
    A layer whose last forward promised all seeds idle has a zero reconstruction loss: it is left out (two
    launches fewer each way per layer, and the same loss)."""
    for layer in layers:
        if layer.rec_loss is not None and not layer.__dict__.get("_rec_is_zero", False):
            loss = loss + weight * layer.rec_loss
    return loss


class SeededLayer(nn.Module):
    """Watches x[..., hidden] with ``num_seeds`` seeds (this rank's shard: global seeds
    ``seed_offset .. seed_offset + num_seeds - 1``).

    Buffers (all in the state_dict): the per-seed state fields of lifecycle.STATE_FIELDS and ``telemetry``
    [N, 8] fp32. Parameters: ``bank.p0``, ``bank.p1``. In training mode forward accumulates telemetry and
    leaves this call's reconstruction loss in ``rec_loss`` for the train loop to add to its loss.

    Idle record: where the layer has read its stages on the host (construction, ``.to()``, its lifecycle
    commands, ``refresh_idle_record``) and found every seed idle, it remembers that for the stage tensor at
    that version. While no write has touched the tensor since (PyTorch bumps its version counter on every
    in-place write: ``stage[i] = s``, ``copy_``, a checkpoint load) the forward promises the op ``all_idle``
    and a lowrank layer skips its lowrank kernel; any write makes the record unknown, and the op then finds
    the live seeds on the device as usual. No step reads the stages to keep the record.
    """

    def __init__(
        self,
        hidden: int,
        num_seeds: int,
        *,
        kind: str = "lowrank",
        rank: int = 8,
        act: str = "relu",
        blend: str = "additive",
        dead_eps: float = 1e-6,
        backend: str = "auto",
        kernel: KernelOptions | None = None,
        layer_key: str = "layer",
        base_seed: int = 0,
        seed_offset: int = 0,
        num_global_seeds: int | None = None,
    ) -> None:
        super().__init__()
        check_kind(kind)
        check_act(act)
        check_backend(backend)
        if num_seeds < 1 or hidden % num_seeds:
            raise ValueError(f"num_seeds={num_seeds} must be >= 1 and divide the layer width hidden={hidden}")
        self.hidden, self.num_seeds, self.chunk = hidden, num_seeds, hidden // num_seeds
        self.kind, self.act, self.dead_eps, self.backend = kind, act, dead_eps, backend
        self.kernel = kernel or KernelOptions()
        self.layer_key, self.seed_offset = layer_key, seed_offset
        # The layer's whole seed population across ranks (equal to num_seeds unless seeds are sharded).
        self.num_global_seeds = num_seeds + seed_offset if num_global_seeds is None else num_global_seeds
        if not 0 <= seed_offset <= self.num_global_seeds - num_seeds:
            raise ValueError(
                f"seed_offset={seed_offset} with num_seeds={num_seeds} does not fit num_global_seeds="
                f"{self.num_global_seeds}"
            )
        self.default_blend = blend_id(blend)
        self.bank = BlueprintBank(
            kind, num_seeds, self.chunk, rank, layer_key=layer_key, base_seed=base_seed, seed_offset=seed_offset
        )
        for name, tensor in SeedState.empty(num_seeds, self.default_blend).tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("telemetry", torch.zeros(num_seeds, NUM_FIELDS))
        self.rec_loss: torch.Tensor | None = None
        self._rec_is_zero = False  # the last forward promised every seed idle: rec_loss is zero
        # The op's calls, each kind checked and planned once (ids are validated where this module writes them)
        self._calls = SeededCalls()
        self._idle_record: tuple[torch.Tensor, int] | None = None
        self.refresh_idle_record()

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Once a step per layer: the state tensors straight from the module's registries (nn.Module.__getattr__
        # costs about a microsecond a name), falling back to attribute access where they are not registered there
        # (a parametrized bank, a buffer replaced by a plain attribute).
        try:
            buffers, bank = self._buffers, self._modules["bank"]._parameters
            stage, blend, alpha, p0, p1 = buffers["stage"], buffers["blend"], buffers["alpha"], bank["p0"], bank["p1"]
            telemetry = buffers["telemetry"] if self.training else None
        except KeyError:
            stage, blend, alpha, p0, p1 = self.stage, self.blend, self.alpha, self.bank.p0, self.bank.p1
            telemetry = self.telemetry if self.training else None
        # known_idle(), inline; under torch.compile first: Dynamo cannot trace a read of the version counter
        record = self._idle_record
        all_idle = (
            not torch.compiler.is_compiling()
            and record is not None
            and record[0] is stage
            and stage._version == record[1]
        )
        y, rec_loss = self._calls(
            x, stage, blend, alpha, p0, p1, telemetry, self.kind, self.act, self.dead_eps, self.backend, self.kernel,
            all_idle,
        )  # fmt: skip
        # plain attributes (set in __init__): skip nn.Module.__setattr__'s registry lookups
        d = self.__dict__
        d["rec_loss"] = rec_loss
        d["_rec_is_zero"] = all_idle  # no seed TRAINING: nothing reconstructs (with_rec_losses)
        return y

    # ---- idle record -----------------------------------------------------------------------------------------
    def known_idle(self) -> bool:
        """True when the idle record holds: every seed was idle when the stages were last read on the host, and
        nothing has written the stage tensor since. False means not known (under torch.compile too)."""
        if torch.compiler.is_compiling() or self._idle_record is None:
            return False
        tensor, version = self._idle_record
        return tensor is self.stage and tensor._version == version

    @torch.no_grad()
    def refresh_idle_record(self) -> bool:
        """Read the stages (one device->host copy) and record whether every seed is idle; returns that."""
        stage = self.stage
        # meta and inference tensors hold no values to read, or no version counter to watch
        readable = stage.device.type != "meta" and not stage.is_inference()
        return self._record_stages(stage.tolist() if readable else None)

    def _record_stages(self, stages: list[int] | None) -> bool:
        """Record ``stages``, the host copy of the stage tensor as it is now (None: not known)."""
        idle = stages is not None and all_idle(stages)
        self._idle_record = (self.stage, self.stage._version) if idle else None
        promises.record(self.stage, idle)  # for compiled calls, which consult it when they run
        return idle

    def __getstate__(self):
        # rec_loss holds the last forward's graph, which neither deepcopy nor pickle can copy; the idle record
        # holds a tensor version that the copy's stage tensor does not share. A copy starts without both.
        state = dict(super().__getstate__())
        state["rec_loss"] = None
        state["_idle_record"] = None
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.refresh_idle_record()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), to_empty() ... put a new tensor in place of stage: read it again (a setup-time copy)
        out = super()._apply(fn, recurse)
        self._calls.clear()
        self.refresh_idle_record()
        return out

    # ---- state -----------------------------------------------------------------------------------------------
    def state(self) -> SeedState:
        return SeedState(**{name: getattr(self, name) for name in STATE_FIELDS})

    def stages(self) -> list[Stage]:
        """Host copy of the stages (one device->host copy)."""
        return [Stage(s) for s in self.stage.tolist()]

    @staticmethod
    def check_step(value: int, name: str = "step") -> int:
        """Steps are stored as int32 (steps_in_stage, embargo_until, germinated_at): refuse what does not fit."""
        if not _INT32_MIN <= int(value) <= _INT32_MAX:
            raise ValueError(f"{name}={value} does not fit the int32 step counters ({_INT32_MIN}..{_INT32_MAX})")
        return int(value)

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.num_seeds:
            raise ValueError(f"seed index {index} out of range for layer {self.layer_key!r}: 0..{self.num_seeds - 1}")
        return int(index)

    @torch.no_grad()
    def germinate(self, index: int, step: int, blend: str | int | None = None) -> None:
        """DORMANT -> GERMINATED: bump the generation and re-draw the seed's blueprint slice."""
        i = self._check_index(index)
        step = self.check_step(step)
        src = int(self.stage[i])
        check_transition(self.seed_offset + i, src, Stage.GERMINATED, "germinate")
        if blend is not None and not isinstance(blend, (str, int)):
            raise ValueError(f"blend must be a name {list(BLEND_NAMES)} or an integer id, got {blend!r}")
        b = self.default_blend if blend is None else (blend_id(blend) if isinstance(blend, str) else int(blend))
        if not 0 <= b < NUM_BLENDS:
            raise ValueError(f"blend id {b} out of range; allowed ids: 0..{NUM_BLENDS - 1}")
        generation = int(self.generation[i]) + 1
        self.bank.reinit_(i, generation, b)
        self.generation[i] = generation
        self.blend[i] = b
        self.germinated_at[i] = step
        self._enter(i, Stage.GERMINATED)
        self.refresh_idle_record()

    @torch.no_grad()
    def apply_stage_changes(self, changes: Iterable[tuple[int, int]], step: int, command: str = "advance") -> None:
        """Apply a batch of (local index, new stage) moves: all are checked first, so a refused batch changes
        nothing. Re-entering DORMANT from CULLED needs the seed's embargo to have passed."""
        changes = [(self._check_index(i), Stage(s)) for i, s in changes]
        seen: set[int] = set()
        for i, _ in changes:
            if i in seen:  # each move is checked against the stage before the batch: one move per seed
                raise IllegalTransition(
                    f"seed {self.seed_offset + i}: command {command!r} names it twice in one batch; "
                    "apply one stage change per seed at a time"
                )
            seen.add(i)
        current = self.stage.tolist()
        embargo = self.embargo_until.tolist()
        for i, dst in changes:
            check_transition(self.seed_offset + i, current[i], dst, command)
            if current[i] == Stage.CULLED and dst == Stage.DORMANT and step < embargo[i]:
                raise IllegalTransition(
                    f"seed {self.seed_offset + i}: command {command!r} refused: CULLED seed is embargoed "
                    f"until step {embargo[i]} (now {step})"
                )
            if dst == Stage.GERMINATED:
                raise IllegalTransition(f"seed {self.seed_offset + i}: use germinate() to enter GERMINATED")
        for i, dst in changes:
            self._enter(i, dst)
            current[i] = int(dst)
        self._record_stages(current)  # the batch's host copy, now up to date: no second read

    def _enter(self, i: int, dst: Stage) -> None:
        self.stage[i] = int(dst)
        self.steps_in_stage[i] = 0
        if dst in (Stage.DORMANT, Stage.CULLED, Stage.CANCELLED, Stage.ROLLED_BACK, Stage.GERMINATED):
            self.alpha[i] = 0.0
            self.alpha_rate[i] = 0.0

    # ---- sharding ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def narrow(self, start: int, count: int) -> SeededLayer:
        """A layer holding ``count`` of this layer's seeds from local index ``start`` on (features
        ``[start*C, (start+count)*C)``), with their state, telemetry and blueprint parameters copied; it keeps
        the global seed numbering (seed_offset, num_global_seeds), so germination draws the same values."""
        if not (start >= 0 and count >= 1 and start + count <= self.num_seeds):
            raise ValueError(f"cannot take seeds {start}..{start + count - 1} of a layer with {self.num_seeds}")
        out = SeededLayer(
            count * self.chunk,
            count,
            kind=self.kind,
            rank=self.bank.rank,
            act=self.act,
            blend=BLEND_NAMES[self.default_blend],
            dead_eps=self.dead_eps,
            backend=self.backend,
            kernel=self.kernel,
            layer_key=self.layer_key,
            base_seed=self.bank.base_seed,
            seed_offset=self.seed_offset + start,
            num_global_seeds=self.num_global_seeds,
        ).to(self.telemetry.device)
        for key, value in self.state_dict().items():
            out.state_dict()[key].copy_(value[start : start + count])
        out.refresh_idle_record()
        return out

    # ---- telemetry -------------------------------------------------------------------------------------------
    def read_telemetry(self, reset: bool = True) -> torch.Tensor:
        """A copy of the accumulated [N, 8] telemetry; zeroes the buffer when ``reset``."""
        out = self.telemetry.clone()
        if reset:
            self.reset_telemetry()
        return out

    @torch.no_grad()
    def reset_telemetry(self) -> None:
        self.telemetry.zero_()

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_key!r}, hidden={self.hidden}, seeds={self.num_seeds} (offset {self.seed_offset}), "
            f"chunk={self.chunk}, kind={self.kind}, act={self.act}, backend={self.backend}"
        )
