"""Postprocessing of run folders: the plain functions behind ``sft/runs_report.ipynb`` and ``sft/samples.ipynb``.

A run folder (written by ``sft/training/runs.py``) holds ``config.json`` and ``metrics.jsonl``: one JSON
object per line. A *train* line is one logged optimizer step (``step``, ``epoch``, ``loss``, ``lr``,
``grad_norm``, token counts, ``tokens_per_s``, ``mfu``, ``peak_mem_gib``, ``step_time_s``); an
*eval* line carries ``eval_loss`` (and ``step``). Nothing here writes to a run except PNG plots and
the fixed-prompt answers the notebooks ask for, and never into a committed run (those go to ``reports/``).
The notebooks' parameters (``SFT_RUN_DIR``, ``SFT_RUNS``, ``SFT_MAX_NEW_TOKENS``) are checked first
(:func:`samples_run_dir`, :func:`report_runs`, :func:`env_int`): a bad one is one ``error:`` line.

Contracts:

- ``select_runs(paths, include_smoke=False) -> list[Path]``: the run folders a report covers: those with
  a ``metrics.jsonl``, smoke runs (``--smoke``, or a ``tiny-*`` preset model) left out unless asked for
  or named one by one.
- ``load_runs(paths) -> DataFrame``: one row per metrics line of every run, in file order, with
  added columns ``run`` (folder name), ``run_dir`` (str), ``kind`` (``"train"`` | ``"eval"``) and
  ``tokens`` (cumulative tokens processed by the end of that step, float; NaN where the run logs
  no token count). Eval lines take the ``tokens`` of the latest train line at or before their step.
- ``plot_loss(df, out_png, x="step"|"tokens") -> Figure``: train loss (solid) and eval loss
  (dashed, markers) of every run on one axes, one colour per run; writes a PNG.
- ``eval_table(df) -> DataFrame`` / ``plot_eval(df, out_png)``: per evaluation, the held-out loss of each
  source, token accuracy and stop rate; the plot draws per-source loss and stop rate against steps.
- ``throughput_table(runs) -> DataFrame``: one row per run (index ``run``); medians over train
  steps after the first (the first holds compilation / warm-up), peak memory as the max.
- ``FIXED_PROMPTS``: project-written conversations answered before and after fine-tuning.
- ``answer_prompts(model_dir, prompts, ...)``: greedy answers, one dict per prompt, from any model the
  trainer makes, rendered and decoded as the trainer's own samples are (``sft.data.render.render_prompt``'s
  template and BOS rule, ``stop_token_ids``, ``sft.model.generate.greedy``).
"""

from __future__ import annotations

import glob
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

# Cumulative token counters the trainer may log, most preferred first. "processed" counts padding
# too, which is what a tokens axis should show: it is what the hardware did.
CUMULATIVE_TOKEN_KEYS = ("tokens_processed", "tokens_seen", "tokens_total", "tokens")
# Per-step token counters: summed into a cumulative count when no cumulative key is logged.
STEP_TOKEN_KEYS = ("step_tokens_processed", "tokens_step", "step_tokens", "tokens_this_step")

# Columns of ``throughput_table``: (output column, metrics key, reduction over train steps).
_TABLE_SPEC = (
    ("tokens_per_s", "tokens_per_s", "median"),
    ("mfu", "mfu", "median"),
    ("step_time_s", "step_time_s", "median"),
    ("peak_mem_gib", "peak_mem_gib", "max"),
)


def _expand(paths: str | Path | Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """``(folder, named)`` for each run folder: from a glob pattern (``named`` False), a folder, or a list."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[tuple[Path, bool]] = []
    for p in paths:
        s = str(p)
        if glob.has_magic(s):
            out.extend((Path(m), False) for m in sorted(glob.glob(s)) if Path(m).is_dir())
        elif Path(s).is_dir():
            out.append((Path(s), True))
    if not out:
        raise FileNotFoundError(f"no run folder matches {paths!r}")
    return out


def is_smoke_run(run_dir: str | Path) -> bool:
    """True for a run made by a recipe's ``--smoke`` (or on a ``tiny-*`` random-init preset): it checks the
    set-up, its numbers say nothing about a model. False when the run's config cannot be read."""
    try:
        cfg = run_config(run_dir)
    except (OSError, ValueError, KeyError):
        return False
    return bool(cfg.get("smoke")) or str(cfg.get("model", "")).startswith("tiny-")


def select_runs(paths: str | Path | Iterable[str | Path], include_smoke: bool = False) -> list[Path]:
    """The run folders of ``paths`` (as :func:`load_runs` takes them) that a report should cover.

    Folders a glob matches without a ``metrics.jsonl`` are skipped (``runs/`` also holds benchmark
    folders); smoke runs (:func:`is_smoke_run`) a glob matches are left out unless ``include_smoke``.
    A folder named one by one is always kept (``FileNotFoundError`` if it has no ``metrics.jsonl``).
    Raises ``FileNotFoundError`` saying what was left out when nothing is left.
    """
    chosen: list[Path] = []
    smoke: list[Path] = []
    for run_dir, named in _expand(paths):
        if not (run_dir / "metrics.jsonl").is_file():
            if named:
                raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run folder?)")
            continue
        if not named and not include_smoke and is_smoke_run(run_dir):
            smoke.append(run_dir)
            continue
        chosen.append(run_dir)
    if smoke:
        log.info("left out %d smoke run(s): %s", len(smoke), ", ".join(p.name for p in smoke))
    if not chosen:
        extra = (
            f" but {len(smoke)} smoke run(s), left out (include_smoke / SFT_INCLUDE_SMOKE=1)" if smoke else ""
        )
        raise FileNotFoundError(f"no run folder with metrics.jsonl matches {paths!r}{extra}")
    return chosen


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of one ``metrics.jsonl``.

    A malformed line raises ``ValueError`` naming the file and line number, except a last line
    without its newline: a run killed mid-write leaves one, and it is skipped with a warning.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: skipping a truncated last line", path, i)
                continue
            raise ValueError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: not a JSON object")
        rows.append(row)
    return rows


def _cumulative_tokens(df: pd.DataFrame) -> pd.Series:
    """Cumulative tokens processed at each line of one run (train lines first, eval lines filled)."""
    train = df["kind"] == "train"
    tokens = pd.Series(math.nan, index=df.index, dtype=float)
    for key in CUMULATIVE_TOKEN_KEYS:
        if key in df and df.loc[train, key].notna().any():
            tokens[train] = df.loc[train, key].astype(float)
            break
    else:
        for key in STEP_TOKEN_KEYS:
            if key in df and df.loc[train, key].notna().any():
                tokens[train] = df.loc[train, key].astype(float).fillna(0).cumsum()
                break
    if tokens[train].isna().all():
        return tokens
    # An eval line at step s reports the model after step s: it gets that step's token count.
    by_step = tokens[train].groupby(df.loc[train, "step"]).last()
    steps = by_step.index.to_numpy()
    for i in df.index[~train]:
        s = df.at[i, "step"] if "step" in df else math.nan
        earlier = steps[steps <= s] if pd.notna(s) else steps[:0]
        tokens[i] = by_step[earlier[-1]] if len(earlier) else 0.0
    return tokens


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """All metric lines of the run folders ``paths`` (a glob like ``"runs/*"``, a folder, or a list).

    Returns a DataFrame with one row per metrics line (file order within a run, runs sorted by
    path) plus the columns ``run``, ``run_dir``, ``kind`` and ``tokens`` (see the module doc).
    A line is an eval line iff it has the key ``eval_loss`` (a non-finite eval loss is written as
    null and stays an eval line). A folder named explicitly without ``metrics.jsonl`` raises
    ``FileNotFoundError``; one matched by a glob is skipped with a warning (``runs/*`` may hold a
    run that failed before its first line). A run with no line yet gives no rows.
    """
    frames = []
    for run_dir, named in _expand(paths):
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            if named:
                raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run folder?)")
            log.warning("%s: no metrics.jsonl, skipped", run_dir)
            continue
        rows = read_metrics(metrics)
        if not rows:
            log.warning("%s: metrics.jsonl is empty", run_dir)
            continue
        df = pd.DataFrame(rows)
        df.insert(0, "run", run_dir.name)
        df.insert(1, "run_dir", str(run_dir))
        df.insert(2, "kind", ["eval" if "eval_loss" in r else "train" for r in rows])
        df["tokens"] = _cumulative_tokens(df)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["run", "run_dir", "kind", "step", "loss", "eval_loss", "tokens"])
    out = pd.concat(frames, ignore_index=True)
    for col in ("loss", "eval_loss"):
        if col not in out:
            out[col] = math.nan
    return out


def plot_loss(df: pd.DataFrame, out_png: str | Path | None = None, x: str = "step", title: str | None = None):
    """Train and eval loss of every run in ``df`` (from ``load_runs``) against ``x``.

    ``x`` is ``"step"`` (optimizer steps) or ``"tokens"`` (cumulative tokens processed). One colour
    per run; train loss is a solid line, eval loss dashed with markers. Writes ``out_png`` (parent
    folders created) when given, and returns the matplotlib Figure (closed for pyplot, so a loop
    over many runs does not pile figures up; a notebook shows it by ending a cell with it).
    """
    import matplotlib.pyplot as plt

    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', got {x!r}")
    if x == "tokens" and df["tokens"].isna().all():
        raise ValueError("no run in df logs a token count: plot against x='step'")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, g) in enumerate(df.groupby("run", sort=False)):
        c = colours[i % len(colours)]
        train = g[(g["kind"] == "train") & g["loss"].notna()]
        ev = g[(g["kind"] == "eval") & g["eval_loss"].notna()]
        if len(train):
            ax.plot(train[x], train["loss"], color=c, lw=1.2, label=f"{run} train")
        if len(ev):
            ax.plot(ev[x], ev["eval_loss"], color=c, ls="--", marker="o", ms=4, label=f"{run} eval")
    ax.set_xlabel("optimizer step" if x == "step" else "tokens processed")
    ax.set_ylabel("loss (mean CE per supervised token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if out_png is not None:
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return fig


def eval_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation of every run in ``df``: ``run, step, eval_loss``, the held-out loss of each
    source (columns ``loss[<source>]``, from ``eval_loss_by_source``), ``eval_token_accuracy`` and
    ``eval_stop_rate`` (NaN where a run does not log them, e.g. runs older than these metrics)."""
    ev = df[df["kind"] == "eval"]
    rows = []
    for _, r in ev.iterrows():
        row = {"run": r["run"], "step": r.get("step"), "eval_loss": r.get("eval_loss")}
        for k in ("eval_token_accuracy", "eval_stop_rate"):
            v = r.get(k)
            row[k] = math.nan if v is None or (isinstance(v, float) and math.isnan(v)) else v
        by_source = r.get("eval_loss_by_source")
        if isinstance(by_source, dict):
            for src, v in by_source.items():
                row[f"loss[{src}]"] = math.nan if v is None else v
        rows.append(row)
    return pd.DataFrame(rows)


def plot_eval(df: pd.DataFrame, out_png: str | Path | None = None):
    """Held-out loss per source (one line per run and source) and the stop rate (the share of held-out
    prompts whose greedy answer ends with the end-of-turn token) against optimizer steps. Writes ``out_png``
    when given; returns the Figure (closed for pyplot)."""
    import matplotlib.pyplot as plt

    table = eval_table(df)
    fig, (ax_loss, ax_stop) = plt.subplots(1, 2, figsize=(10, 4))
    for run, g in table.groupby("run", sort=False):
        sources = [c for c in g.columns if c.startswith("loss[") and g[c].notna().any()]
        for col in sources or ["eval_loss"]:
            label = run if col == "eval_loss" or len(sources) < 2 else f"{run} {col[5:-1]}"
            ax_loss.plot(g["step"], g[col], marker="o", ms=3, label=label)
        if g["eval_stop_rate"].notna().any():
            ax_stop.plot(g["step"], g["eval_stop_rate"], marker="o", ms=3, label=run)
    ax_loss.set(xlabel="optimizer step", ylabel="held-out loss", title="held-out loss per source")
    ax_stop.set(xlabel="optimizer step", ylabel="stop rate", title="stop rate", ylim=(-0.05, 1.05))
    for ax in (ax_loss, ax_stop):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return fig


def save_run_plots(
    df: pd.DataFrame, prefix: str = "report_loss", repo: str | Path | None = None
) -> list[Path]:
    """For each run in ``df``: ``<run_dir>/<prefix>_step.png`` and, if it logs tokens, ``<prefix>_tokens.png``.

    The prefix keeps these apart from the trainer's own ``loss.png``. A committed run (:func:`is_committed`)
    is never rewritten: its plots go to ``<repo>/reports/<run>/`` (``repo``: the repository root, default
    the one holding this file). Returns the paths written.
    """
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    written = []
    for run, g in df.groupby("run", sort=False):
        run_dir = Path(g["run_dir"].iloc[0])
        for x in ("step", "tokens"):
            if x == "tokens" and g["tokens"].isna().all():
                continue
            out = output_path(run_dir, f"{prefix}_{x}.png", repo)
            plot_loss(g, out, x=x, title=run)
            written.append(out)
    return written


def throughput_table(runs: pd.DataFrame | str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per run: how fast, how big, how far the loss went.

    ``runs`` is a ``load_runs`` DataFrame or anything ``load_runs`` accepts. Columns: ``steps``
    (train lines), ``tokens`` (cumulative tokens processed at the last train line, padding included),
    ``tokens_nonpad`` and ``tokens_supervised`` (the same counters, when logged), medians of
    ``tokens_per_s``, ``mfu`` (fraction of peak, NaN on CPU), ``step_time_s`` over train steps
    after the first (the first includes warm-up and compilation; with one step it is used), the
    max ``peak_mem_gib``, ``first_loss`` / ``last_loss`` (train), ``first_eval_loss`` /
    ``last_eval_loss``, and ``wall_s`` (sum of ``step_time_s``). Missing metrics are NaN.
    """
    df = runs if isinstance(runs, pd.DataFrame) else load_runs(runs)
    rows = []
    for run, g in df.groupby("run", sort=False):
        train = g[g["kind"] == "train"]
        ev = g[(g["kind"] == "eval") & g["eval_loss"].notna()]
        steady = train.iloc[1:] if len(train) > 1 else train
        row: dict[str, Any] = {"run": run, "steps": len(train)}
        row["tokens"] = train["tokens"].iloc[-1] if len(train) else math.nan
        for key in ("tokens_nonpad", "tokens_supervised"):
            vals = train[key].dropna() if key in train else pd.Series(dtype=float)
            row[key] = vals.iloc[-1] if len(vals) else math.nan
        for col, key, how in _TABLE_SPEC:
            vals = steady[key].dropna() if key in steady else pd.Series(dtype=float)
            row[col] = getattr(vals, how)() if len(vals) else math.nan
        losses = train["loss"].dropna()
        row["first_loss"] = losses.iloc[0] if len(losses) else math.nan
        row["last_loss"] = losses.iloc[-1] if len(losses) else math.nan
        row["first_eval_loss"] = ev["eval_loss"].iloc[0] if len(ev) else math.nan
        row["last_eval_loss"] = ev["eval_loss"].iloc[-1] if len(ev) else math.nan
        row["wall_s"] = train["step_time_s"].sum() if "step_time_s" in train else math.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


# Written for this project. Each is a Conversation (sft.data.schema): the last message is the user's turn
# to answer. The last one is a follow-up: the model must use the earlier exchange.
FIXED_PROMPTS: list[dict[str, Any]] = [
    {
        "name": "list",
        "messages": [
            {
                "role": "user",
                "content": "List five things to check before going on a day hike in the mountains.",
            },
        ],
    },
    {
        "name": "logic",
        "messages": [
            {
                "role": "user",
                "content": "Anna is taller than Ben. Ben is taller than Carla. Is Carla taller than Anna? "
                "Explain your reasoning in two sentences.",
            },
        ],
    },
    {
        "name": "email",
        "messages": [
            {
                "role": "user",
                "content": "Write a short, polite email to my landlord asking when the broken kitchen "
                "tap will be repaired.",
            },
        ],
    },
    {
        "name": "recipe",
        "messages": [
            {
                "role": "user",
                "content": "Give me a simple recipe for tomato soup, with ingredients and steps.",
            },
        ],
    },
    {
        "name": "follow-up",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And roughly how many people live there?"},
        ],
    },
]


def load_model_and_tokenizer(model: str | Path | dict[str, Any]):
    """A causal LM (eval mode, on the first GPU if there is one, else CPU) and its tokenizer.

    ``model`` is what ``sft.model.models.load_model_and_tokenizer`` loads: a Hugging Face folder (a run's
    ``final/``), a ``.gguf`` file, ``"smollm2-135m-instruct"``, a cached hub id or a tiny preset; or
    a run's resolved config as a dict (see ``run_config``), so a run's base model comes back exactly
    as the run started from it (a tiny preset is re-made from the run's seed). Safetensors/GGUF only.
    """
    import torch

    from sft.config import TrainConfig
    from sft.model.models import load_model_and_tokenizer as load

    cfg = TrainConfig.from_dict(model) if isinstance(model, dict) else TrainConfig(model=str(model))
    lm, tok = load(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return lm.to(device).eval(), tok


# What a tokenizer without a chat template is asked with: plain ``role: content`` lines, then ``assistant:``.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def answer_prompts(
    model_dir: str | Path | None,
    prompts: Sequence[dict[str, Any]] = FIXED_PROMPTS,
    *,
    max_new_tokens: int = 128,
    model=None,
    tokenizer=None,
    chat_template: str | None = None,
) -> list[dict[str, Any]]:
    """Greedy answers of one model to ``prompts`` (items like ``FIXED_PROMPTS``).

    The model is ``model_dir`` (see ``load_model_and_tokenizer``) or, when given, ``model`` and
    ``tokenizer`` as they are. Each conversation is rendered as training renders a prompt
    (``sft.data.render.prompt_text`` / ``prompt_ids``): the tokenizer's chat template (the template
    ``final/`` was trained with) and a generation prompt, BOS prepended where the tokenizer adds one and the
    template does not write it; a tokenizer without a template gets plain ``role: content`` lines
    (``PLAIN_TEMPLATE``). ``chat_template`` overrides the tokenizer's: pass the fine-tuned tokenizer's
    template when asking the base model, so before and after see the same text. Decoding is greedy, one
    prompt at a time (no padding to get wrong), through ``sft.model.generate.greedy`` as the trainer's own
    samples are, stopping at EOS or the template's end-of-turn token (``sft.data.render.stop_token_ids``;
    EOS alone for a template whose turn end cannot be located) or after ``max_new_tokens``.

    Returns one dict per prompt: ``name``, ``prompt`` (the last user message), ``prompt_text``
    (the rendered text the model saw, less any BOS prepended), ``answer`` (decoded new tokens, special
    tokens dropped, stripped) and ``new_tokens`` (how many were generated, the stop token included).
    """
    from sft.data.render import TemplateError, prompt_ids, prompt_text, stop_token_ids
    from sft.model.generate import greedy

    if model is None or tokenizer is None:
        model, tokenizer = load_model_and_tokenizer(model_dir)
    template = chat_template or (None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE)
    try:
        stops = stop_token_ids(tokenizer, template)
    except TemplateError:  # a template that cannot be masked (not prefix-stable): no end-of-turn token known
        stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    out = []
    for item in prompts:
        messages = item["messages"]
        text = prompt_text(messages, tokenizer, template)
        new = greedy(model, prompt_ids(text, tokenizer), max_new_tokens, stops, tokenizer=tokenizer)
        out.append(
            {
                "name": item.get("name", ""),
                "prompt": messages[-1]["content"],
                "prompt_text": text,
                "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
                "new_tokens": len(new),
            }
        )
    return out


def compare_answers(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> pd.DataFrame:
    """A table of the same prompts answered by two models: columns ``name, prompt, before, after``."""
    if [b["name"] for b in before] != [a["name"] for a in after]:
        raise ValueError("before and after answer different prompts")
    return pd.DataFrame(
        {
            "name": [b["name"] for b in before],
            "prompt": [b["prompt"] for b in before],
            "before": [b["answer"] for b in before],
            "after": [a["answer"] for a in after],
        }
    )


def read_samples(run_dir: str | Path) -> pd.DataFrame:
    """The trainer's own held-out samples (``samples.jsonl``), one row per prompt.

    Each line of the file is one answer: ``stage`` (``"before"`` | ``"after"``), ``step``, ``prompt``,
    ``reference`` (the held-out answer) and ``answer``. Returns columns ``prompt, reference, before,
    after`` in first-seen prompt order (a stage never run is NaN; a resumed run's later line wins).
    An absent file gives an empty frame with those columns.
    """
    cols = ["prompt", "reference", "before", "after"]
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return pd.DataFrame(columns=cols)
    rows = read_metrics(path)
    by_prompt: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = by_prompt.setdefault(r["prompt"], {"prompt": r["prompt"], "reference": r.get("reference")})
        entry[r["stage"]] = r["answer"]
    return pd.DataFrame(list(by_prompt.values()), columns=cols)


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved training config a run saved in ``config.json`` (the dict holding ``model``).

    ``sft/training/runs.py`` may store it at the top level or under ``config`` / ``train_config`` beside the
    git commit and package versions; either way the training fields come back as a flat dict.
    """
    saved = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    for holder in (saved, saved.get("config"), saved.get("train_config")):
        if isinstance(holder, dict) and isinstance(holder.get("model"), str):
            return holder
    raise KeyError(f"{run_dir}/config.json names no base model (looked for 'model')")


def base_model_of(run_dir: str | Path) -> str:
    """The model a run started from, as its config names it (hub id, path, ``.gguf`` or preset)."""
    return run_config(run_dir)["model"]


# ----------------------------------------------------------------------------- notebook parameters


class NotebookInputError(ValueError):
    """A notebook parameter (an ``SFT_*`` environment variable) that cannot work. Jupyter shows it as one
    ``error: ...`` line (IPython renders an exception through its ``_render_traceback_``), not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"error: {self}"]


def _from_repo(path: str | Path, repo: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(repo) / p


def samples_run_dir(value: str | None, repo: str | Path) -> Path:
    """The run ``samples.ipynb`` answers with: ``SFT_RUN_DIR`` (``value``; relative to ``repo``) or, when
    unset, the run under ``repo/runs`` whose ``final/`` was written last. NotebookInputError (one line)
    for a folder that does not exist, is not a run, has no ``final/`` or whose config names no model; a
    ``final/`` given for its run folder is taken as the run."""
    repo = Path(repo)
    if value is None or not str(value).strip():
        finished = sorted(
            (p.parent for p in (repo / "runs").glob("*/final")), key=lambda p: (p / "final").stat().st_mtime
        )
        if not finished:
            raise NotebookInputError(f"no run folder with final/ under {repo / 'runs'}: set SFT_RUN_DIR")
        return finished[-1]
    run = _from_repo(value, repo)
    where = f"SFT_RUN_DIR={value}"
    if run.name == "final" and (run.parent / "config.json").is_file():
        run = run.parent
    if not run.exists():
        raise NotebookInputError(f"{where}: {run} does not exist")
    if not run.is_dir():
        raise NotebookInputError(f"{where}: {run} is not a folder (give a run folder under runs/)")
    if not (run / "config.json").is_file():
        raise NotebookInputError(f"{where}: {run} is not a run folder (no config.json)")
    if not (run / "final" / "config.json").is_file():
        raise NotebookInputError(
            f"{where}: {run} has no final/ model (the run has not finished, or ran with --no-save_final)"
        )
    try:
        base_model_of(run)
    except (OSError, ValueError, KeyError) as e:
        raise NotebookInputError(f"{where}: {run}/config.json: {str(e).splitlines()[0]}") from None
    return run


def report_runs(value: str | None, repo: str | Path, include_smoke: bool = False) -> list[Path]:
    """The runs ``runs_report.ipynb`` covers: ``select_runs`` of ``SFT_RUNS`` (``value``, a glob or a folder,
    relative to ``repo``; default ``runs/*``), with what matched nothing as one NotebookInputError line."""
    pattern = str(_from_repo(value or "runs/*", Path(repo)))
    try:
        return select_runs(pattern, include_smoke=include_smoke)
    except FileNotFoundError as e:
        raise NotebookInputError(f"SFT_RUNS={value or 'runs/*'}: {e}") from None


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """An integer notebook parameter from the environment (``SFT_MAX_NEW_TOKENS``...), at least ``minimum``."""
    import os

    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise NotebookInputError(f"{name}={raw}: expected an integer") from None
    if value < minimum:
        raise NotebookInputError(f"{name}={raw}: must be >= {minimum}")
    return value


def is_committed(run_dir: str | Path) -> bool:
    """True when ``run_dir`` is part of a git repository's committed files (its ``metrics.jsonl`` or
    ``config.json`` is tracked): a committed result that the notebooks must not rewrite."""
    import subprocess

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    for name in ("metrics.jsonl", "config.json"):
        if not (run_dir / name).is_file():
            continue
        try:
            p = subprocess.run(
                ["git", "ls-files", "--error-unmatch", name],
                cwd=run_dir,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        if p.returncode == 0:
            return True
    return False


def output_path(run_dir: str | Path, name: str, repo: str | Path) -> Path:
    """Where a notebook writes ``name`` for a run: beside the run (``run_dir/name``), except for a committed
    run (:func:`is_committed`), whose files stay as committed: ``repo/reports/<run>/name`` (git-ignored)."""
    run_dir = Path(run_dir)
    if is_committed(run_dir):
        out = Path(repo) / "reports" / run_dir.name / name
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    return run_dir / name
