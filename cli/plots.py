"""Plots of a run, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_plot(series: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> None:
    """Training loss and validation accuracy (or loss) against steps, beside epsilon spent."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if "train_loss" in series:
        steps, values = zip(*series["train_loss"])
        left.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss (batch)")
        window = max(1, len(values) // 30)
        if window > 1:
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                      for i in range(len(values))]
            left.plot(steps, smooth, color="tab:blue", label=f"train loss ({window}-step mean)")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    validation = "val_accuracy" if "val_accuracy" in series else "val_loss"
    if validation in series:
        axis = left.twinx()
        steps, values = zip(*series[validation])
        axis.plot(steps, values, color="tab:orange", marker="o", label=validation.replace("_", " "))
        axis.set_ylabel(validation.replace("_", " "))
        axis.legend(loc="lower right")
    left.legend(loc="lower left")
    left.set_title("loss and validation")
    if "epsilon" in series:
        steps, values = zip(*series["epsilon"])
        right.plot(steps, values, color="tab:red", marker=".", markersize=3)
    right.set_xlabel("step")
    right.set_ylabel("ε spent")
    right.set_title("privacy spent (ledger)")
    right.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
