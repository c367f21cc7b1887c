"""Loss curves of a training stage: `plots/<stage>/loss.csv` (DVC plots) and `loss.png`.

The CSV has one row per optimizer step: ``step, tokens, train_loss, val_loss, lr``.
``val_loss`` is filled on the steps where the val loss was measured and empty elsewhere
(Vega-Lite, behind `dvc plots`, skips the empty cells and joins the measured points).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from lmpipe.io import atomic_path, write_text_atomic

COLUMNS = ("step", "tokens", "train_loss", "val_loss", "lr")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_loss_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in COLUMNS])
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def read_loss_csv(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return out


def write_loss_png(path: str | Path, rows: list[Mapping[str, Any]], title: str = "") -> Path:
    """Train loss (raw and smoothed) and val loss against the step; lr on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows if r.get("train_loss") is not None]
    train = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    vsteps = [r["step"] for r in rows if r.get("val_loss") is not None]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    lr_steps = [r["step"] for r in rows if r.get("lr") is not None]
    lrs = [r["lr"] for r in rows if r.get("lr") is not None]

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8)
        # exponential moving average, bias-corrected, for a readable trend
        smooth, avg, beta = [], 0.0, 0.9 if len(train) > 50 else 0.0
        for i, v in enumerate(train, 1):
            avg = beta * avg + (1 - beta) * v
            smooth.append(avg / (1 - beta**i) if beta else v)
        ax.plot(steps, smooth, color="tab:blue", label="train loss")
    if val:
        ax.plot(vsteps, val, "o-", color="tab:orange", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax2 = ax.twinx()
        (line,) = ax2.plot(lr_steps, lrs, color="tab:gray", linewidth=0.8, linestyle="--")
        ax2.set_ylabel("learning rate")
        handles.append(line)
        labels.append("lr")
    if handles:
        ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def write_loss_plots(folder: str | Path, rows: list[Mapping[str, Any]], title: str = "") -> dict[str, Path]:
    folder = Path(folder)
    return {"csv": write_loss_csv(folder / "loss.csv", rows),
            "png": write_loss_png(folder / "loss.png", rows, title)}


__all__ = ["COLUMNS", "read_loss_csv", "write_loss_csv", "write_loss_png", "write_loss_plots"]
