"""The loss-curve PNG written with every run (the HTML report is `run_report`)."""

from __future__ import annotations

from tuneloop.core.files import atomic_path
from pathlib import Path


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Training and validation loss against optimizer step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if name == "validation" else None,
                    linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
