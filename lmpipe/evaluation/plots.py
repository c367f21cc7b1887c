"""The figures: a training stage's loss curve, and the report card's charts (every model's
loss curves, bits per byte per model). Drawn offline with matplotlib's Agg backend; a PNG
carries no timestamp, so the same numbers give the same file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmpipe.core.files import atomic_path  # noqa: E402
from lmpipe.core.names import LOSS_CSV, LOSS_PNG  # noqa: E402
from lmpipe.core.records import write_loss_csv  # noqa: E402


def write_loss_plots(folder: str | Path, rows: list[Mapping[str, Any]], title: str = "") -> dict[str, Path]:
    """plots/<stage>/loss.csv (DVC plots) and loss.png of a training stage."""
    folder = Path(folder)
    return {"csv": write_loss_csv(folder / LOSS_CSV, rows),
            "png": write_loss_png(folder / LOSS_PNG, rows, title)}


def write_loss_png(path: str | Path, rows: list[Mapping[str, Any]], title: str = "") -> Path:
    """Train loss (raw and smoothed) and val loss against the step; lr on a second axis."""
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


# Corpus pretraining and instruction finetuning measure different losses (every token of the
# corpus vs the response tokens of instruction examples): they get separate axes, never one.
PANELS = (("corpus pretraining: loss on corpus tokens", ("rnn", "transformer")),
          ("instruction finetuning: loss on response tokens", ("sft", "lora")))


def plot_loss_curves(curves: Mapping[str, list[dict[str, float]]], out: str | os.PathLike) -> Path:
    """Train (solid) and validation (markers, dashed) loss of every neural model, corpus
    pretraining and instruction finetuning side by side (PANELS)."""
    return plot_runs_loss_curves({"": curves}, out, "Training and validation loss")


def plot_runs_loss_curves(runs: Mapping[str, Mapping[str, list[dict[str, float]]]],
                          out: str | os.PathLike, title: str) -> Path:
    """The loss curves of one or more runs ({run label: {model: loss rows}}), overlaid: one
    colour per model, one line style per run (`lmpipe compare` draws two).

    The x axis of a panel is tokens seen when every curve in it records it (models with
    different batch sizes are then comparable), else the optimizer step.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    colors = dict(zip(("rnn", "transformer", "sft", "lora"), ("tab:blue", "tab:orange",
                                                               "tab:green", "tab:red")))
    dashes = ("-", "--", ":", "-.")
    for ax, (panel, models) in zip(axes, PANELS):
        rows_in = [rows for curves in runs.values() for m, rows in curves.items() if m in models]
        x_key = "tokens" if rows_in and all(any("tokens" in r for r in rows)
                                            for rows in rows_in) else "step"
        for r_i, (label, curves) in enumerate(runs.items()):
            for m in models:
                for col, marker, kind in (("train_loss", "", "train"), ("val_loss", "o", "val")):
                    pts = [(r[x_key], r[col]) for r in curves.get(m, []) if x_key in r and col in r]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, marker=marker or None, markersize=3,
                                linestyle=dashes[r_i % len(dashes)], color=colors.get(m),
                                alpha=1.0 if col == "train_loss" else 0.7,
                                label=" ".join(p for p in (label, m, kind) if p))
        if not rows_in:
            ax.text(0.5, 0.5, "no loss curves", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7, ncol=2)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return out


def plot_bpb(bpb: Mapping[str, float], out: str | os.PathLike, split: str = "test") -> Path:
    """Bar chart of bits per byte per model (lower is better), values printed on the bars."""
    names = list(bpb)
    values = [float(bpb[n]) for n in names]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bars = ax.bar(names, values, color="#4c72b0")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"Bits per byte on the {split} split")
    if values:
        ax.set_ylim(0, max(values) * 1.15)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)
    return out


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN is no position on an axis


def plot_sweep(points: list[tuple[Mapping[str, str], float]], params: list[str], target: str,
               out: str | os.PathLike, title: str = "sweep") -> Path:
    """`target` against each swept param, one panel per param (a sweep's report).

    Numeric values sit on a numeric axis (log scale when they span 20x or more, as learning
    rates do); other values are categories in first-seen order. The best point is circled
    (lowest target; the caller sorts, so it comes first)."""
    fig, axes = plt.subplots(1, len(params), figsize=(max(6.0, 4.2 * len(params)), 4.0),
                             dpi=100, squeeze=False)
    for ax, param in zip(axes[0], params):
        raw = [(p.get(param, ""), y) for p, y in points]
        nums = [_as_number(x) for x, _ in raw]
        if all(n is not None for n in nums):
            xs = nums
            positive = [x for x in xs if x > 0]
            if len(positive) == len(xs) and max(xs) / min(xs) >= 20:
                ax.set_xscale("log")
            distinct = sorted(set(xs))
            if len(distinct) <= 8:  # the swept values themselves, as written
                ax.set_xticks(distinct, [next(x for x, _ in raw if _as_number(x) == d)
                                         for d in distinct], rotation=20)
                ax.minorticks_off()
        else:
            cats = list(dict.fromkeys(x for x, _ in raw))
            xs = [cats.index(x) for x, _ in raw]
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        ys = [y for _, y in raw]
        ax.plot(xs, ys, "o", color="tab:blue", alpha=0.8)
        ax.plot(xs[:1], ys[:1], "o", markersize=12, markerfacecolor="none",
                markeredgecolor="tab:red", label="best")
        ax.set_xlabel(param)
        ax.set_ylabel(target)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: {target} against each swept param", fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(out)
