"""A short, real tour of one SeededLayer: germinate seeds, move them through the lifecycle, train a few
batches of random data through a small host model, and print the per-seed telemetry.

    python scripts/demo_layer.py                # backend "auto": the PyTorch reference on CPU, Triton on CUDA
    python scripts/demo_layer.py --kind diagonal --steps 20
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from morpho_dist.blends import BLEND_NAMES
from morpho_dist.kernels.layout import F_COUNT, TELEMETRY_FIELDS
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.ops import resolve_backend


def print_table(layer: SeededLayer, telemetry: torch.Tensor, title: str) -> None:
    stages, blends, alphas = layer.stages(), layer.blend.tolist(), layer.alpha.tolist()
    head = ["seed", "stage", "blend", "alpha", *TELEMETRY_FIELDS]
    rows = []
    for i, tel in enumerate(telemetry.tolist()):
        cells = [str(layer.seed_offset + i), stages[i].name, BLEND_NAMES[blends[i]], f"{alphas[i]:.2f}"]
        cells += [f"{int(v)}" if f in ("count", "dead") else f"{v:.4g}" for f, v in zip(TELEMETRY_FIELDS, tel)]
        rows.append(cells)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["lowrank", "diagonal"], default="lowrank")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="batches per phase")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backend", choices=["auto", "reference", "triton"], default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    layer = SeededLayer(args.hidden, args.seeds, kind=args.kind, rank=4, backend=args.backend, base_seed=0)
    model = nn.Sequential(nn.Linear(16, args.hidden), nn.GELU(), layer, nn.Linear(args.hidden, 1)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = nn.Linear(16, 1).to(device).requires_grad_(False)  # a random regression task
    print(f"layer: {layer.extra_repr()}")
    print(f"op backend in use: {resolve_backend(args.backend, device)} on {device}")

    def train(phase: str, step0: int) -> int:
        for _ in range(args.steps):
            x = torch.randn(args.batch, 16, device=device)
            loss = nn.functional.mse_loss(model(x), target(x)) + layer.rec_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # the alpha ramp of GRAFTING seeds (what an alpha schedule does each step)
                grafting = layer.stage == int(Stage.GRAFTING)
                layer.alpha.copy_(torch.where(grafting, (layer.alpha + layer.alpha_rate).clamp(0, 1), layer.alpha))
        tel = layer.read_telemetry(reset=True)
        print_table(layer, tel, f"after {phase} (steps {step0}..{step0 + args.steps - 1}, loss {loss.item():.4f})")
        assert torch.all(tel[:, F_COUNT] == args.steps * args.batch * layer.chunk)
        return step0 + args.steps

    step = 0
    # Seed 0 (additive) and seed 1 (multiplicative) will be grafted; seed 2 (linear) trains by reconstruction.
    layer.germinate(0, step, blend="additive")
    layer.germinate(1, step, blend="multiplicative")
    layer.germinate(2, step, blend="linear")
    layer.apply_stage_changes([(0, Stage.TRAINING), (1, Stage.TRAINING), (2, Stage.TRAINING)], step)
    step = train("TRAINING (incubator + reconstruction)", step)

    layer.apply_stage_changes([(0, Stage.GRAFTING), (1, Stage.GRAFTING)], step, command="promote")
    layer.alpha_rate[[0, 1]] = 1.0 / args.steps  # ramp alpha 0 -> 1 over one phase
    step = train("GRAFTING (alpha ramp)", step)

    layer.apply_stage_changes([(0, Stage.STABILIZATION), (1, Stage.CULLED), (2, Stage.CANCELLED)], step)
    step = train("STABILIZATION / CULLED / CANCELLED", step)

    try:  # an illegal move is refused and changes nothing
        layer.apply_stage_changes([(3, Stage.FOSSILIZED)], step)
    except ValueError as err:
        print(f"\nrefused as expected: {err}")


if __name__ == "__main__":
    main()
