"""Run reports: the loss-curve PNG and a self-contained HTML scoreboard."""

from __future__ import annotations

import base64
import html
import os
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
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def scoreboard_html(title: str, rows: list[dict], columns: list[str], image: Path | None,
                    notes: list[str]) -> str:
    """A self-contained HTML page: the scoreboard table, notes and the embedded loss curve."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *columns])
    body = ""
    for row in rows:
        cells = "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns)
        body += f"<tr><th scope='row'>{html.escape(str(row['model']))}</th>{cells}</tr>"
    img = ""
    if image and image.exists():
        data = base64.b64encode(image.read_bytes()).decode()
        img = f"<h2>Loss curve</h2><img alt='training and validation loss' src='data:image/png;base64,{data}'>"
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.4rem .8rem;"
            "text-align:right}th[scope=row]{text-align:left}</style>"
            f"<h1>{html.escape(title)}</h1><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table><ul>{items}</ul>{img}</html>")


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return html.escape(str(value))
