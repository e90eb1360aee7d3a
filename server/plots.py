"""Plots of a run, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_plot(series: dict[str, list[tuple[int, float]]], path: Path, title: str = "",
                  names: dict[str, str] | None = None) -> None:
    """Loss and validation accuracy against steps, beside epsilon spent (one line per silo)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    handles = []
    if "train_loss" in series:
        steps, values = zip(*series["train_loss"])
        handles += left.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss (batch)")
        window = max(1, len(values) // 30)
        if window > 1:
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                      for i in range(len(values))]
            handles += left.plot(steps, smooth, color="tab:blue", label=f"train loss ({window}-step mean)")
    if "val_loss" in series:
        steps, values = zip(*series["val_loss"])
        handles += left.plot(steps, values, color="tab:green", marker=".", label="validation loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    if "val_accuracy" in series:
        axis = left.twinx()
        steps, values = zip(*series["val_accuracy"])
        handles += axis.plot(steps, values, color="tab:orange", marker="o", label="validation accuracy")
        axis.set_ylabel("validation accuracy")
    if handles:
        left.legend(handles=handles, loc="lower left", fontsize="small")
    left.set_title("loss and validation")
    curves = {key: value for key, value in series.items() if key == "epsilon" or key.startswith("epsilon.")}
    for key, values in sorted(curves.items()):
        steps, values = zip(*values)
        label = (names or {}).get(key.removeprefix("epsilon."), key.removeprefix("epsilon."))
        right.plot(steps, values, marker=".", markersize=3, label=None if key == "epsilon" else label)
    if len(curves) > 1:
        right.legend(fontsize="small")
    right.set_xlabel("step")
    right.set_ylabel("ε spent")
    right.set_title("privacy spent per silo" if len(curves) > 1 else "privacy spent (ledger)")
    right.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def traffic_plot(rows: list[tuple[int, int, str, int, int]], path: Path) -> None:
    """Bytes per silo per round, up and down, on the serialized Flower messages."""
    figure, (up_axis, down_axis) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    by_node: dict[str, list[tuple[int, int, int]]] = {}
    for round, _attempt, silo, down, up in rows:
        by_node.setdefault(silo, []).append((round, up, down))
    for label, points in sorted(by_node.items()):
        rounds, ups, downs = zip(*points)
        up_axis.plot(rounds, ups, marker=".", linewidth=0.8, label=label)
        down_axis.plot(rounds, downs, marker=".", linewidth=0.8, label=label)
    for axis, direction in ((up_axis, "up (silo → coordinator)"), (down_axis, "down (coordinator → silo)")):
        axis.set_ylim(bottom=0)
        axis.set_xlabel("round")
        axis.set_ylabel("bytes per message")
        axis.set_title(direction)
        axis.grid(alpha=0.3)
        if by_node:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
