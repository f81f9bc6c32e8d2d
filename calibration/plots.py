"""Quality vs compression plots: one line per method, dense as the reference."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def plot_quality_vs_compression(rows, path: str | Path, title: str = "") -> Path:
    """Two panels, streaming perplexity and mean passkey accuracy, against the measured compression ratio."""
    methods = defaultdict(list)
    dense = None
    for row in rows:
        if row.cache == "dense":
            dense = row
        else:
            methods[row.cache.split(" ")[0]].append(row)
    figure, (ppl_axis, passkey_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for method, points in sorted(methods.items()):
        points.sort(key=lambda row: row.measured_ratio)
        ratios = [row.measured_ratio for row in points]
        ppl_axis.plot(ratios, [row.perplexity for row in points], marker="o", label=method)
        passkey_axis.plot(ratios, [sum(row.passkey.values()) / len(row.passkey) for row in points], marker="o", label=method)
    if dense is not None:
        ppl_axis.axhline(dense.perplexity, color="black", linestyle="--", label="dense")
        passkey_axis.axhline(sum(dense.passkey.values()) / len(dense.passkey), color="black", linestyle="--", label="dense")
    for axis, label in ((ppl_axis, "streaming perplexity (lower is better)"), (passkey_axis, "passkey accuracy, mean over depths")):
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda ratio, _: f"{ratio:g}:1"))
        axis.set_xlabel("measured compression ratio (dense bytes / bytes held)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    passkey_axis.set_ylim(-0.05, 1.05)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_perplexity_vs_memory(curves: dict[str, list[tuple[float, float]]], baseline: float, path: str | Path, title: str = "") -> Path:
    """Perplexity against the share of dense K/V memory kept, one line per curve of (memory, perplexity) points."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, points in sorted(curves.items()):
        points = sorted(points)
        axis.plot([100 * memory for memory, _ in points], [ppl for _, ppl in points], marker="o", label=label)
    axis.axhline(baseline, color="black", linestyle="--", label="dense")
    axis.set_xlabel("K/V memory kept in the compressed store (% of dense)")
    axis.set_ylabel("streaming perplexity on held-out text")
    axis.grid(True, alpha=0.3)
    axis.legend()
    if title:
        axis.set_title(title)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
