"""One picture per tabletop suite: every task's agent view at fixed init state 0, with its instruction.

    MUJOCO_GL=egl python benchmarks/tabletop_gallery.py [--image-size 256] [--out-dir docs/images]

Writes ``tabletop_<suite>.png`` for each suite (the images the README shows).
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from pathlib import Path

from envs.tabletop.env import TabletopEnv
from envs.tabletop.tasks import SUITES, TASKS


def suite_figure(suite: str, image_size: int, path: Path) -> Path:
    """Render every task of ``suite`` from the agent view at fixed init state 0 into one PNG grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [name for name, task in TASKS.items() if task.suite == suite]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        env = TabletopEnv(name, cameras=("agentview",), image_size=image_size)
        try:
            obs, _ = env.reset(options={"init_state": 0})
        finally:
            env.close()
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(obs["agentview_image"])
        ax.set_title(f"{name}\n" + "\n".join(textwrap.wrap(f'"{env.instruction}"', 34)), fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Tabletop suite: {suite}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # room for the title above the captions
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    for suite in SUITES:
        print(suite_figure(suite, args.image_size, args.out_dir / f"tabletop_{suite}.png"))


if __name__ == "__main__":
    main()
