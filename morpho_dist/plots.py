"""Pictures of the seed population: the stage colours and the seed-state image logged to wandb.

Rendered with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so a training process
can draw them whatever backend the user's session has.
"""

from __future__ import annotations

import numpy as np

from morpho_dist.lifecycle import NUM_STAGES, Stage

# Stage -> RGB, shared by the seed-state image and scripts/plot_lifecycle.py.
STAGE_COLORS = {
    Stage.DORMANT: (200, 200, 200),
    Stage.GERMINATED: (255, 235, 59),
    Stage.TRAINING: (255, 152, 0),
    Stage.GRAFTING: (3, 169, 244),
    Stage.STABILIZATION: (0, 188, 212),
    Stage.EVALUATING: (156, 39, 176),
    Stage.FINE_TUNING: (63, 81, 181),
    Stage.FOSSILIZED: (76, 175, 80),
    Stage.CULLED: (244, 67, 54),
    Stage.CANCELLED: (121, 85, 72),
    Stage.ROLLED_BACK: (0, 0, 0),
}
PAD_COLOR = (255, 255, 255)  # a layer with fewer seeds than the widest one


def rgb(stage: Stage) -> tuple[float, float, float]:
    r, g, b = STAGE_COLORS[Stage(stage)]
    return r / 255, g / 255, b / 255


def stage_image(stages: dict[str, list[int]], step: int | None = None, width_px: int = 900) -> np.ndarray:
    """The seed population as a picture: one labelled row per layer, one cell per seed (x: global seed index),
    coloured by stage, a legend of every stage below; RGB uint8 ``[H, W, 3]``, ``width_px`` wide and about
    260 px tall for one layer (40 px more per further layer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(stages) or ["(no seeded layer)"]
    seeds = max((len(s) for s in stages.values()), default=1) or 1
    grid = np.full((len(names), seeds), np.nan)
    for row, seq in enumerate(stages.values()):
        grid[row, : len(seq)] = [int(s) for s in seq]
    cmap = ListedColormap([rgb(s) for s in Stage]).with_extremes(bad=[c / 255 for c in PAD_COLOR])

    dpi, height = 100, 2.2 + 0.4 * len(names)  # inches: title, axis, legend, and the rows
    fig = Figure(figsize=(width_px / dpi, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        vmin=-0.5,
        vmax=NUM_STAGES - 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_yticks(range(len(names)), names, fontsize=9)
    every = max(1, -(-seeds // 16))
    ax.set_xticks(range(0, seeds, every))
    ax.set_xlabel("seed", fontsize=9)
    if seeds <= 64:  # cell borders while cells are wide enough to see them
        ax.set_xticks(np.arange(-0.5, seeds, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, len(names), 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
    ax.set_title("seed stages" + (f" at step {step}" if step is not None else ""), fontsize=10)
    handles = [Patch(facecolor=rgb(s), edgecolor="grey", label=s.name) for s in Stage]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.55 / height, 1, 1))  # the legend's two rows below the axes
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
