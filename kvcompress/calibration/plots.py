"""Quality vs compression plots: one line per method, dense as the reference."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from kvcompress.extras import require

require("matplotlib", "calibration", "Plotting results")
import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

MEMORY_OPTIONS = ("keep_ratio=",)  # options that move a point along its method's line


def _line_name(label: str) -> str:
    """The line a row belongs to: its method and the options that change the method itself (e.g. a merge)."""
    words = label.split(" ")
    return " ".join([words[0]] + [word for word in words[1:] if "=" in word and not word.startswith(MEMORY_OPTIONS)])


def plot_quality_vs_compression(rows, path: str | Path, title: str = "") -> Path:
    """Two panels, streaming perplexity and mean passkey accuracy, against the measured compression ratio."""
    methods = defaultdict(list)
    dense = None
    for row in rows:
        if row.cache == "dense":
            dense = row
        else:
            methods[_line_name(row.cache)].append(row)
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


def plot_gate_report(report: dict, path: str | Path, title: str = "") -> Path:
    """Per-head AUC histogram, reliability curve and confusion matrices (at 0.5 and 0.1) of trained gates."""
    heads = list(report["heads"].values())
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    aucs = [head["auc"] for head in heads if head["auc"] == head["auc"]]
    axes[0].hist(aucs, bins=40, range=(0.0, 1.0), color="tab:blue")
    axes[0].axvline(report["median_auc"], color="black", linestyle="--", label=f"median {report['median_auc']:.3f}")
    axes[0].set_xlabel("held-out ROC AUC per head")
    axes[0].set_ylabel("heads")
    axes[0].legend()
    for head in heads:
        points = head["reliability"]
        axes[1].plot([p["predicted"] for p in points], [p["observed"] for p in points], color="tab:blue", alpha=0.15)
    axes[1].plot([0, 1], [0, 1], color="black", linestyle="--")
    axes[1].set_xlabel("gate probability (bin mean)")
    axes[1].set_ylabel("observed positive rate")
    axes[1].set_title("reliability, one line per head")
    for axis, threshold in zip(axes[2:], ("0.5", "0.1")):
        counts = {name: sum(head["confusion"][threshold][name] for head in heads) for name in ("tn", "fp", "fn", "tp")}
        matrix = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
        axis.imshow(matrix, cmap="Blues")
        for row in range(2):
            for column in range(2):
                axis.text(column, row, f"{matrix[row][column]:,}", ha="center", va="center")
        axis.set_xticks([0, 1], ["evict", "keep"])
        axis.set_yticks([0, 1], ["not needed", "needed"])
        axis.set_title(f"all heads, threshold {threshold}")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_sidecar_training(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Held-out output error and the seed-001 ratios over training steps; the healthy band [0.5, 2] shaded."""
    steps = [entry["step"] for entry in history]
    figure, (error_axis, ratio_axis) = plt.subplots(1, 2, figsize=(10, 4))
    error_axis.plot(steps, [entry["output_error"] for entry in history], marker="o", label="output error (relative)")
    error_axis.plot(steps, [1 - entry["output_cosine"] for entry in history], marker="o", label="1 - output cosine")
    error_axis.set_yscale("log")
    error_axis.set_ylabel("held-out attention output vs dense")
    for name in ("key_norm_ratio", "value_norm_ratio", "jacobian_norm_ratio", "entropy_ratio"):
        ratio_axis.plot(steps, [entry[name] for entry in history], marker="o", label=name.replace("_", " "))
    ratio_axis.axhspan(0.5, 2.0, color="green", alpha=0.08, label="healthy [0.5, 2]")
    ratio_axis.set_yscale("log", base=2)
    ratio_axis.set_ylabel("merged / dense")
    for axis in (error_axis, ratio_axis):
        axis.set_xlabel("training step")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path = path if path.suffix else path.with_suffix(".png")  # what matplotlib writes for a name without one: report that name
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
