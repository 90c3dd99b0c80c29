"""PNG figures a person would rather look at than read: a run's training curves and the demo's
comparison of teachers and students. Matplotlib's Agg backend, written through fsspec."""

from __future__ import annotations

import io
from typing import Any

from kdpipe import storage


def _figure(rows: int, cols: int, width: float = 11.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(rows, cols, figsize=(width, height * rows), squeeze=False)


def _save(plt, fig, uri: str, storage_options: dict[str, Any]) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs, path = storage.filesystem(uri, storage_options)
    storage.write_bytes(fs, path, buf.getvalue())


def write_curves(history: list[dict[str, Any]], uri: str, storage_options: dict[str, Any], title: str,
                 others: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Loss parts, held-out accuracy, throughput and the schedules per epoch. `others` adds the
    held-out accuracy of other runs (e.g. the baseline) to the accuracy panel for comparison."""
    plt, fig, ax = _figure(2, 2)
    epochs = [h["epoch"] + 1 for h in history]
    for key in ("loss", "kd", "ce"):
        if any(key in h for h in history):
            ax[0][0].plot(epochs, [h.get(key, float("nan")) for h in history], label=key)
    ax[0][0].set(title="training loss (per sample)", xlabel="epoch")
    ax[0][0].legend()
    if any("holdout_accuracy" in h for h in history):
        ax[0][1].plot(epochs, [100 * h.get("holdout_accuracy", float("nan")) for h in history], label="this run")
    for name, other in (others or {}).items():
        ax[0][1].plot([h["epoch"] + 1 for h in other], [100 * h.get("holdout_accuracy", float("nan")) for h in other],
                      label=name, linestyle="--")
    ax[0][1].set(title="held-out accuracy (%)", xlabel="epoch")
    ax[0][1].legend()
    ax[1][0].plot(epochs, [h.get("samples_per_s", float("nan")) for h in history])
    ax[1][0].set(title="training samples/s (rank 0)", xlabel="epoch")
    ax[1][1].plot(epochs, [h.get("alpha", float("nan")) for h in history], label="alpha")
    ax2 = ax[1][1].twinx()
    ax2.plot(epochs, [h.get("temperature", float("nan")) for h in history], color="tab:orange", label="temperature")
    ax[1][1].set(title="alpha (left) and temperature (right)", xlabel="epoch")
    fig.suptitle(title)
    _save(plt, fig, uri, storage_options)


def write_comparison(accuracies: dict[str, float], uri: str, storage_options: dict[str, Any], title: str) -> None:
    """Held-out accuracy of every model (teachers, student alone, student distilled) as bars."""
    plt, fig, ax = _figure(1, 1, width=8.0, height=3.6)
    names = list(accuracies)
    values = [100 * accuracies[n] for n in names]
    colors = ["tab:gray" if n.startswith("teacher") else "tab:blue" for n in names]
    bars = ax[0][0].barh(names, values, color=colors)
    for bar, v in zip(bars, values, strict=True):
        ax[0][0].text(v, bar.get_y() + bar.get_height() / 2, f" {v:.2f}", va="center")
    low = min(values)
    ax[0][0].set(xlim=(max(0.0, low - 5), 100), xlabel="held-out accuracy (%)", title=title)
    ax[0][0].invert_yaxis()
    _save(plt, fig, uri, storage_options)
