"""What a run writes for people: a JSONL metrics log, a summary table, a PNG plot."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collabsurgery.common import atomic


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write one JSON record per line, atomically."""
    atomic.write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def headline(record: dict[str, Any], ema: bool = False) -> dict[str, float]:
    """The numbers a run is judged by: head 0, best head on hold-out, and the ensemble, on test;
    ``ema``: those of the EMA weights (``record["ema"]``, runs with ``train.ema_decay``)."""
    if ema:
        record = record["ema"]
    best = record["holdout"]["best_head"]
    return {
        "head0_test_acc": record["test"]["head_acc"][0],
        "best_head": best,
        "best_head_holdout_acc": record["holdout"]["head_acc"][best],
        "best_head_test_acc": record["test"]["head_acc"][best],
        "ensemble_test_acc": record["test"]["ensemble_acc"],
    }


def flat_scalars(record: dict[str, Any]) -> dict[str, float]:
    """One epoch record as flat ``split/name`` scalars, for trackers."""
    out = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    for prefix, source in (("", record), ("ema/", record.get("ema"))):
        for split in ("holdout", "test") if source else ():
            for h, acc in enumerate(source[split]["head_acc"]):
                out[f"{prefix}{split}/head{h}_acc"] = acc
            out[f"{prefix}{split}/ensemble_acc"] = source[split]["ensemble_acc"]
    return out


def summary_table(record: dict[str, Any], names: Sequence[str] = ()) -> str:
    """Accuracy of every head and of the ensemble on hold-out and test, as aligned text;
    ``names`` (optional, one per head) says what each head is (an architecture, "leader")."""
    rows = []
    best = record["holdout"]["best_head"]
    for h, (hold, test, loss) in enumerate(zip(record["holdout"]["head_acc"],
                                               record["test"]["head_acc"],
                                               record["test"]["head_loss"])):
        tags = ", ".join(t for t in (names[h] if names else "", "best" if h == best else "") if t)
        rows.append((f"head {h}" + (f" ({tags})" if tags else ""), f"{hold:>12.4f}",
                     f"{test:>9.4f}", f"{loss:>9.4f}"))
    rows.append(("ensemble", f"{record['holdout']['ensemble_acc']:>12.4f}",
                 f"{record['test']['ensemble_acc']:>9.4f}", ""))
    ema = record.get("ema")
    if ema:  # the EMA weights' heads (train.ema_decay)
        ema_best = ema["holdout"]["best_head"]
        for h, (hold, test, loss) in enumerate(zip(ema["holdout"]["head_acc"],
                                                   ema["test"]["head_acc"],
                                                   ema["test"]["head_loss"])):
            rows.append((f"EMA head {h}" + (" (best)" if h == ema_best else ""),
                         f"{hold:>12.4f}", f"{test:>9.4f}", f"{loss:>9.4f}"))
        rows.append(("EMA ensemble", f"{ema['holdout']['ensemble_acc']:>12.4f}",
                     f"{ema['test']['ensemble_acc']:>9.4f}", ""))
    width = max(14, *(len(r[0]) for r in rows))
    lines = [f"{'':<{width}} {'hold-out acc':>12} {'test acc':>9} {'test loss':>9}"]
    lines += [f"{r[0]:<{width}} {r[1]} {r[2]} {r[3]}".rstrip() for r in rows]
    if "diversity" in record["test"]:
        lines.append(f"diversity of the heads on test (mean pairwise L2 distance of their "
                     f"probabilities): {record['test']['diversity']:.4f}")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display is ever needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, ax, path: Path, legend_size: int = 8, grid_axis: str = "both") -> Path:
    """Grid, legend, tight layout, write ``path`` atomically as a 100-dpi PNG and free the
    figure."""
    ax.grid(axis=grid_axis, alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)
    return path


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Test accuracy per epoch of every head (thin) and of the ensemble (thick) as a PNG."""
    epochs = [r["epoch"] for r in history]
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for h in range(len(history[0]["test"]["head_acc"])):
        ax.plot(epochs, [r["test"]["head_acc"][h] for r in history], lw=1, label=f"head {h}")
    ax.plot(epochs, [r["test"]["ensemble_acc"] for r in history], lw=2.5, color="black",
            label="ensemble")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=title)
    return save_figure(fig, ax, path)
