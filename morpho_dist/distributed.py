"""Process environment and process group: torchrun's variables are read here and nowhere else.

    env = read_env()                       # RANK, WORLD_SIZE, LOCAL_RANK (defaults: one process)
    device = pick_device(env, "auto")      # cuda:LOCAL_RANK when CUDA is there, else cpu
    with process_group(env, device):       # gloo on CPU, nccl on CUDA; no-op for one process
    # several ranks on one GPU (tests, debugging; not a speed mode): ranks_per_device=2 puts local ranks 0 and 1
    # on cuda:0, and backend "auto" then picks gloo (NCCL refuses two ranks on one device)
    device = pick_device(env, "cuda", ranks_per_device=2)
    with process_group(env, device, backend="auto", ranks_per_device=2):
    model = wrap_ddp(model, env, device)   # DDP, broadcast_buffers=False: each rank keeps its telemetry buffer

``Mesh`` is the one mesh object (axes ``dp`` and ``seed``, a torch DeviceMesh underneath); the sharding plans
that apply it to a wrapped model (seed shards, tensor parallel host layers, DDP over ``dp``) are in
``morpho_dist.sharding``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_env() -> DistEnv:
    """The one place that reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    env = DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    if not 0 <= env.rank < env.world_size:
        raise RuntimeError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
    return env


MODES = ("data", "seed", "hybrid")


@dataclass(frozen=True)
class Mesh:
    """The (dp, seed) mesh: ``dp`` ranks hold replicas and split the batch, ``seed`` ranks split every seeded
    layer's seed population. ``data``: dp = world, seed = 1; ``seed``: dp = 1, seed = world; ``hybrid``:
    seed = ``sharding.seed_degree``, dp = world / seed. Rank r sits at (dp_rank, seed_rank) = divmod(r, seed).
    ``device_mesh`` is the torch DeviceMesh (dims named "dp", "seed"); None in a single process."""

    mode: str
    dp: int
    seed: int = 1
    rank: int = 0
    device_mesh: Any = field(default=None, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return self.dp * self.seed

    @property
    def dp_rank(self) -> int:
        return self.rank // self.seed

    @property
    def seed_rank(self) -> int:
        return self.rank % self.seed

    @property
    def seed_mesh(self) -> Any:
        """The 1-D ``seed`` sub-mesh (tensor parallelism of the seeded points); None without a process group."""
        return self.device_mesh["seed"] if self.device_mesh is not None else None

    @property
    def dp_mesh(self) -> Any:
        return self.device_mesh["dp"] if self.device_mesh is not None else None

    @classmethod
    def degrees(cls, sharding_cfg: Any, world_size: int) -> tuple[str, int, int]:
        """(mode, dp, seed) for a world size; ValueError with the reason when they do not fit."""
        mode = str(sharding_cfg.mode)
        if mode not in MODES:
            raise ValueError(f"sharding.mode={mode!r} is not known; allowed values: {list(MODES)}")
        want = int(getattr(sharding_cfg, "seed_degree", 0) or 0)
        if mode == "data":
            dp, seed = world_size, 1
        elif mode == "seed":
            seed = want or world_size
            if seed != world_size:
                raise ValueError(
                    f"sharding=seed shards seeds over all {world_size} ranks but sharding.seed_degree={seed}; "
                    "use sharding=hybrid for dp x seed"
                )
            dp = 1
        else:
            seed = want or 1
            if seed < 1 or world_size % seed:
                raise ValueError(
                    f"sharding=hybrid: sharding.seed_degree={seed} must divide the world size {world_size} "
                    f"(dp * seed == world_size)"
                )
            dp = world_size // seed
        if dp * seed != world_size:
            raise ValueError(f"mesh dp={dp} x seed={seed} != world size {world_size}")
        return mode, dp, seed

    @classmethod
    def from_config(cls, sharding_cfg: Any, env: DistEnv, device: torch.device | None = None) -> Mesh:
        """Validate the degrees against the world size and build the DeviceMesh (when there is a process
        group): dims ("dp", "seed"), gloo on CPU, nccl on CUDA."""
        mode, dp, seed = cls.degrees(sharding_cfg, env.world_size)
        device_mesh = None
        if is_initialized() and env.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            kind = device.type if device is not None else "cpu"
            device_mesh = init_device_mesh(kind, (dp, seed), mesh_dim_names=("dp", "seed"))
        return cls(mode=mode, dp=dp, seed=seed, rank=env.rank, device_mesh=device_mesh)

    def check_seed_counts(self, counts: dict[str, int]) -> None:
        """Every seeded layer's seed count must divide by the seed degree (ValueError naming the layer)."""
        for name, n in counts.items():
            if n % self.seed:
                raise ValueError(
                    f"layer {name!r} has {n} seeds, not divisible by the seed degree {self.seed} "
                    f"(sharding={self.mode}, world size {self.world_size}); set seeds.per_layer to a multiple "
                    f"of {self.seed}"
                )

    def group(self, axis: str) -> Any:
        """The process group of one mesh axis ("dp" or "seed"); None without a process group."""
        return self.device_mesh.get_group(axis) if self.device_mesh is not None else None


BACKENDS = ("auto", "nccl", "gloo")


def pick_device(env: DistEnv, preference: str = "auto", ranks_per_device: int = 1) -> torch.device:
    """cpu, or cuda:(LOCAL_RANK // ranks_per_device) (made the current CUDA device). ``ranks_per_device`` > 1
    lets several ranks share one GPU: a test and debugging mode (they take turns on it), not a speed mode."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but CUDA is not available")
    index = env.local_rank // max(int(ranks_per_device), 1)
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"train.ranks_per_device={ranks_per_device}: local rank {env.local_rank} would need cuda:{index}, but "
            f"this node has {torch.cuda.device_count()} GPU(s); set train.ranks_per_device to at least "
            f"{-(-(env.local_rank + 1) // torch.cuda.device_count())}"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_backend(choice: str, device: torch.device | None, ranks_per_device: int = 1) -> str:
    """The process-group backend for ``sharding.backend``: ``auto`` is nccl on CUDA with one rank per GPU, gloo
    on the CPU or when ranks share a GPU (NCCL refuses two ranks on one device); ``gloo`` works on CUDA too."""
    if choice not in BACKENDS:
        raise ValueError(f"sharding.backend={choice!r} is not allowed; allowed values: {list(BACKENDS)}")
    cuda = device is not None and device.type == "cuda"
    if choice == "auto":
        return "nccl" if cuda and ranks_per_device == 1 else "gloo"
    if choice == "nccl" and not (cuda and ranks_per_device == 1):
        raise ValueError(
            "sharding.backend='nccl' needs train.device=cuda and train.ranks_per_device=1; allowed values with a "
            "CPU or a shared GPU: ['auto', 'gloo']"
        )
    return choice


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_process_group(
    env: DistEnv,
    device: torch.device | None,
    timeout_s: float | None = None,
    *,
    backend: str = "auto",
    ranks_per_device: int = 1,
) -> bool:
    """Join the process group (``resolve_backend``: gloo for CPU, nccl for CUDA) when there are several
    processes; True when this call created it (the caller then destroys it). ``timeout_s``: every collective of
    the group (and of the mesh's sub-groups) fails after that long instead of waiting for a lost rank forever."""
    if not env.distributed or is_initialized():
        return False
    backend = resolve_backend(backend, device, ranks_per_device)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    if timeout_s:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # a restarted torchrun attempt: the agent's store still holds the previous attempt's addresses under
        # the same keys, so join through a prefix of this attempt's own
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            env.world_size,
            is_master=False,
            timeout=kwargs.get("timeout", datetime.timedelta(minutes=10)),
        )
        kwargs["store"] = dist.PrefixStore(f"/morpho_dist/attempt_{restart}", store)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kwargs)
    return True


def destroy_process_group(barrier: bool = False) -> None:
    """``barrier``: on a clean exit, let every rank finish its collectives before any tears its gloo/NCCL
    connections down (a rank that closes early can abort a peer still in flight). Not after an error: a
    failed peer would make the barrier wait for the whole collective timeout."""
    if is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
        # Free the groups now: left to the interpreter's teardown, a gloo group held in a reference cycle (the
        # seed mesh's) was destroyed after Python shut down and aborted the process ("terminate called without
        # an active exception", SIGABRT) in about 1 of 12 2-rank runs that had finished cleanly.
        gc.collect()


@contextlib.contextmanager
def process_group(
    env: DistEnv,
    device: torch.device | None,
    timeout_s: float | None = None,
    *,
    backend: str = "auto",
    ranks_per_device: int = 1,
):
    """``init_process_group`` for the body (yields whether it created the group); on leaving, the group it
    created is destroyed: after a barrier on a clean exit, at once after an error."""
    created = init_process_group(env, device, timeout_s, backend=backend, ranks_per_device=ranks_per_device)
    try:
        yield created
    except BaseException:
        if created:
            destroy_process_group()
        raise
    if created:
        destroy_process_group(barrier=True)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value of ``obj`` on every rank (identity without a process group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def gather_object(value: Any) -> list[Any]:
    """Every rank's (picklable) ``value``, in rank order; [value] without a process group."""
    if not is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_equal(value: Any) -> bool:
    """Whether every rank holds the same (picklable) ``value``."""
    values = gather_object(value)
    return all(v == values[0] for v in values)


def shared_run_dir(env: DistEnv, root: str = "outputs") -> str:
    """A fresh run dir chosen by rank 0 and handed to every rank (needs the process group when distributed).
    Under torchrun, a restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) gets the first attempt's dir back: rank
    0 notes it in ``<root>/.elastic/<run id>-<agent pid>``, a name every attempt of one torchrun shares."""
    path = None
    if env.is_main:
        path = os.path.join(root, time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S"))
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            note = os.path.join(root, ".elastic", f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.getppid()}")
            if int(os.environ["TORCHELASTIC_RESTART_COUNT"] or 0) > 0 and os.path.isfile(note):
                with open(note) as fh:
                    path = fh.read().strip() or path
            else:
                os.makedirs(os.path.dirname(note), exist_ok=True)
                with open(note, "w") as fh:
                    fh.write(path)
    return broadcast_object(path)


def wrap_ddp(
    model: nn.Module,
    env: DistEnv,
    device: torch.device,
    find_unused_parameters: bool = False,
    mesh: Mesh | None = None,
    tensor_parallel: bool = False,
) -> nn.Module:
    """DistributedDataParallel over the ``dp`` axis (identity when it has one rank). broadcast_buffers=False:
    each rank keeps its own telemetry buffer; seed state buffers stay equal because every rank applies the
    same decisions. With tensor-parallel host layers DDP gets the ``dp`` sub-mesh (torch's DDP + TP path)."""
    dp = mesh.dp if mesh is not None else env.world_size
    if not env.distributed or dp == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    where: dict[str, Any] = {}
    if mesh is not None and mesh.device_mesh is not None:
        where = {"device_mesh": mesh.dp_mesh} if tensor_parallel else {"process_group": mesh.group("dp")}
    with warnings.catch_warnings():
        # newer torch suggests forward_sync_buffers, which still syncs buffers at init: rank-local telemetry
        # buffers need broadcast_buffers=False (the warning itself says to keep it for that case)
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=ids,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
            **where,
        )


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
