"""What a run leaves in ``--out DIR``: ``metrics.json`` and ``curves.png`` (rank 0 only)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_curves(path: Path, metrics: dict) -> bool:
    """Loss curves (train, validation) and the validation accuracy or perplexity per epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)", stacklevel=2)
        return False
    epochs = list(range(1, len(metrics["train_loss"]) + 1))
    lm = metrics["task"] == "lm"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, metrics["train_loss"], "o-", label="train (with the recipe's smoothing/mixup)")
    ax1.plot(epochs, metrics["val_loss"], "s-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy" + (" per character" if lm else ""))
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    key, label = ("val_perplexity", "validation perplexity") if lm else ("val_accuracy", "validation accuracy")
    ax2.plot(epochs, metrics[key], "s-", color="C1", label=label)
    best = metrics.get("best_epoch")
    if best:
        ax2.axvline(best, color="gray", ls="--", lw=1, label=f"chosen on validation (epoch {best})")
    test_key = "test_perplexity" if lm else "test_accuracy"
    if metrics.get(test_key) is not None and best:
        ax2.plot([best], [metrics[test_key]], "*", ms=12, color="C3",
                 label=f"test {metrics[test_key]:.4g} (evaluated once)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(label)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{metrics['model']} on {metrics['data']} — {metrics.get('device', '')}, "
                 f"{metrics.get('world_size', 1)} process(es)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
