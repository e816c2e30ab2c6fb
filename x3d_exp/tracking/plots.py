"""The figures a run and a sweep attach to MLflow: learning curves, per-class accuracy, top-1 against GMACs."""

from __future__ import annotations

from pathlib import Path
from typing import List


def _pyplot():
    # No display on a training node: the file backend, chosen before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plots(history: List[dict], per_class: List[float], class_names: List[str], out_dir: Path) -> List[Path]:
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    evaluated = [r for r in history if "val_top1" in r]
    ax_loss.plot([r["epoch"] for r in evaluated], [r["val_loss"] for r in evaluated], label="val")
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("loss"), ax_loss.legend()
    ax_acc.plot([r["epoch"] for r in evaluated], [r["val_top1"] for r in evaluated], marker="o")
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("val top-1"), ax_acc.set_ylim(0, 1)
    curves = out_dir / "learning_curves.png"
    fig.tight_layout(), fig.savefig(curves), plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(per_class)), 4))
    ax.bar(range(len(per_class)), per_class)
    if len(class_names) <= 40:
        ax.set_xticks(range(len(per_class)), class_names, rotation=60, ha="right")
    ax.set_ylabel("test top-1"), ax.set_ylim(0, 1), ax.set_title("per-class accuracy")
    per_class_png = out_dir / "per_class_accuracy.png"
    fig.tight_layout(), fig.savefig(per_class_png), plt.close(fig)
    return [curves, per_class_png]


def plot_top1_vs_gmacs(table, title: str, path: Path, summary_csv: str) -> Path:
    """The X3D paper's Figure 2 view: test top-1 against inference cost, one labelled point per finished job."""
    plt = _pyplot()
    done = table[(table.status == "FINISHED") & table.gmacs.notna() & table.test_top1.notna()]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(done.gmacs, done.test_top1, zorder=3)
    # Jobs of equal accuracy and similar cost would print their labels on top of each other: stagger them.
    for i, (_, row) in enumerate(done.sort_values("gmacs").iterrows()):
        ax.annotate(row.changed, (row.gmacs, row.test_top1), textcoords="offset points", xytext=(4, 4 + 9 * (i % 3)),
                    fontsize=7)
    failed = int((table.status != "FINISHED").sum())
    title = f"{title}: {len(done)} finished" + (f", {failed} failed (see {summary_csv})" if failed else "")
    return _save_cost_plot(plt, fig, ax, done.gmacs, "test top-1", title, path)


def _save_cost_plot(plt, fig, ax, gmacs, ylabel: str, title: str, path: Path) -> Path:
    """Axes, title and file of an accuracy-against-GMACs figure (log GMACs when they span more than 10x)."""
    if len(gmacs) and gmacs.max() > 10 * gmacs.min():
        ax.set_xscale("log")
    ax.set_xlabel("GMACs per training clip (the clip each job trained on)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _greek(axis: str) -> str:
    """gamma_tau -> γτ, gamma_s -> γs (also inside "contract gamma_s")."""
    return axis.replace("gamma_tau", "γτ").replace("gamma_", "γ")


def plot_expansion_path(table, title: str, path: Path) -> Path:
    """The X3D paper's Figure 2: every finished candidate's val top-1 against its GMACs (trained clip), the chosen
    model of each step joined into the expansion path and labelled with the axis it expanded."""
    plt = _pyplot()
    done = table[(table.status == "FINISHED") & table.gmacs.notna() & table.val_top1.notna()]
    chosen = done[done.chosen].sort_values(["step", "gmacs"])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(done.gmacs, done.val_top1, color="0.6", zorder=2, label="candidates")
    for _, row in done[~done.chosen].iterrows():
        ax.annotate(_greek(row.axis), (row.gmacs, row.val_top1), textcoords="offset points",
                    xytext=(3, -9), fontsize=7, color="0.4")
    ax.plot(chosen.gmacs, chosen.val_top1, marker="o", color="C3", zorder=3, label="expansion path")
    for _, row in chosen.iterrows():
        ax.annotate(f"{row.step}: {_greek(row.axis)}", (row.gmacs, row.val_top1),
                    textcoords="offset points", xytext=(4, 5), fontsize=8, color="C3")
    ax.legend(loc="lower right")
    failed = int((table.status != "FINISHED").sum())
    title = f"{title}: {len(table)} candidates" + (f", {failed} failed" if failed else "")
    return _save_cost_plot(plt, fig, ax, done.gmacs, "val top-1", title, path)
