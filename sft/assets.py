"""The pictures the README shows, made again from committed files: ``python -m sft.assets [OUT_DIR]``.

Writes into ``assets/`` (or ``OUT_DIR``):

- ``loss_curves.png`` (:func:`loss_curves`): train and held-out loss of the committed real runs (every
  ``runs/*`` folder with a ``metrics.jsonl``, smoke runs left out: :func:`sft.report.select_runs`), one
  panel per run, against optimizer steps;
- ``results.png`` (:func:`results_chart`): the README's results table, 2023 recipe vs this repository, one
  panel per metric, from ``assets/results.csv`` (columns ``metric, setup, value, unit, source``: one row per
  bar, ``source`` = the committed file under ``runs/`` the figure comes from). Update the CSV, run the
  command again;
- ``data_flow.png`` (:func:`data_flow`): the data flow, source to run folder, one box per step with the
  module that does it.

Each function returns the path written; a CSV row that cannot be read raises ValueError naming the row.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from sft.config import error_exit

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
RESULT_COLUMNS = ("metric", "setup", "value", "unit", "source")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(out: str | Path, runs_glob: str | Path = REPO / "runs" / "*") -> Path:
    """One panel per real run in ``runs_glob``: train loss per logged step, held-out loss as markers."""
    from sft import report

    df = report.load_runs(report.select_runs(runs_glob))
    groups = list(df.groupby("run", sort=True))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for ax, (run, g) in zip(axes[0], groups, strict=True):
        train = g[(g["kind"] == "train") & g["loss"].notna()]
        ev = g[(g["kind"] == "eval") & g["eval_loss"].notna()]
        ax.plot(train["step"], train["loss"], lw=1, label="train")
        ax.plot(ev["step"], ev["eval_loss"], "o--", label="held-out")
        ax.set_title(run, fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (mean CE per supervised token)")
    return _save(fig, out)


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results CSV (see the module doc), ``value`` as float; ValueError naming a bad row."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
            raise ValueError(
                f"{path}: expected the columns {', '.join(RESULT_COLUMNS)}, got {reader.fieldnames}"
            )
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                rows.append({**row, "value": float(row["value"])})
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{i}: value {row['value']!r} is not a number") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def results_chart(out: str | Path, csv_path: str | Path = ASSETS / "results.csv") -> Path:
    """Horizontal bars, one panel per metric (in CSV order), one bar per setup, the value written on it;
    the 2023 recipe's bars grey, this repository's blue."""
    rows = read_results(csv_path)
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 1.1 + 1.0 * len(rows)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        mine = [r for r in rows if r["metric"] == metric]
        colours = ["0.6" if r["setup"].startswith("2023") else "tab:blue" for r in mine]
        ax.barh(range(len(mine)), [r["value"] for r in mine], color=colours)
        ax.set_yticks(range(len(mine)), [r["setup"] for r in mine], fontsize=8)
        ax.invert_yaxis()
        for k, r in enumerate(mine):
            ax.text(r["value"], k, f" {r['value']:,g} {r['unit']}", va="center", fontsize=8)
        ax.set_xlim(0, 1.3 * max(r["value"] for r in mine))
        ax.set_title(f"{metric} ({mine[0]['unit']})", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("MPT-7B on one H200: the 2023 recipe vs this repository", fontsize=10)
    return _save(fig, out)


FLOW = (
    ("source", "hub id | local jsonl/parquet\n| bundled sample", "sft/data/sources.py"),
    ("adapter", "rows -> Conversation\n[{role, content}]", "sft/data/formats.py"),
    ("render", "chat template ->\n(input_ids, labels)", "sft/data/render.py"),
    ("packer", "rows of max_len,\ndocument ids kept", "sft/data/packing.py"),
    ("model", "attention inside\neach document", "sft/model/models.py, mpt.py"),
    ("loss", "mean CE over the step's\nsupervised tokens", "sft/model/loss.py"),
    ("optimizer", "AdamW (fp32 / bf16\nKahan / SR)", "sft/training/optim.py"),
    ("run folder", "config, metrics, samples,\ncheckpoints, final/", "sft/training/runs.py"),
)


def data_flow(out: str | Path) -> Path:
    """The data flow of GUIDE.md section 2 as boxes and arrows, one direction, two rows of four."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2))
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 2)
    ax.axis("off")
    centres = [(k + 0.5, 1.5) for k in range(4)] + [(3.5 - k, 0.5) for k in range(4)]  # a U-turn
    for (x, y), (name, what, where) in zip(centres, FLOW, strict=True):
        ax.add_patch(plt.Rectangle((x - 0.42, y - 0.3), 0.84, 0.6, fc="#e8f0fb", ec="tab:blue", lw=1.2))
        ax.text(x, y + 0.15, name, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x, y - 0.05, what, ha="center", va="center", fontsize=8)
        ax.text(x, y - 0.24, where, ha="center", va="center", fontsize=7, color="0.35", family="monospace")
    for (x0, y0), (x1, y1) in zip(centres, centres[1:], strict=False):
        if y0 == y1:
            dx = 0.42 if x1 > x0 else -0.42
            start, end = (x0 + dx, y0), (x1 - dx, y1)
        else:
            start, end = (x0, y0 - 0.3), (x1, y1 + 0.3)
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.set_title("data flow: one direction, each arrow a function with a pinned test", fontsize=10)
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Software": None})  # no version stamp: same bytes on re-run
    _pyplot().close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m sft.assets [OUT_DIR]``: write the three pictures (default ``assets/``); prints their paths."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else ASSETS
    try:
        paths = [
            loss_curves(out / "loss_curves.png"),
            results_chart(out / "results.png"),
            data_flow(out / "data_flow.png"),
        ]
    except (OSError, ValueError) as e:
        return error_exit(e)
    sys.stdout.write("".join(f"{p}\n" for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
