"""The postprocessing notebooks run headless (nbclient) against a tiny run made here, and are committed clean."""

from __future__ import annotations

import json
import runpy
import statistics
import sys
from pathlib import Path

import pytest

# the notebook packages are not on every machine (the GPU image has neither): skip this file there, so that
# ``pytest -m gpu`` collects
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

from sft import report  # noqa: E402  (after the importorskip above)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [REPO / "sft" / "runs_report.ipynb", REPO / "sft" / "samples.ipynb"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# one smoke run per recipe: (recipe script, run name); the suite runs both notebooks on each
RECIPES = [
    ("train_smollm2_guanaco.py", "20250101-000000_tiny-llama_bundled"),
    ("train_mpt_guanaco.py", "20250101-000000_tiny-mpt_bundled"),
    ("train_mpt_openorca.py", "20250101-000000_tiny-mpt_openorca-sample"),
]


def recipe_smoke_run(script: str, root: Path, run_name: str) -> Path:
    """A real smoke run through a recipe's entry point (tiny random model, its bundled sample, 3 steps).

    Runs ``sft/<script> --smoke`` in this process (``runpy`` without ``__main__``, then the same
    ``main(DEFAULTS, argv, smoke=SMOKE)`` call its ``__main__`` block makes) to spare a second
    interpreter start; the recipe's own sys.path edit is undone afterwards.
    """
    from sft.training import trainer

    saved = list(sys.path)
    try:
        recipe = runpy.run_path(str(REPO / "sft" / script), run_name="recipe")
    finally:
        sys.path[:] = saved
    argv = ["--smoke", f"--out_dir={root}", f"--run_name={run_name}", "--no-progress"]
    assert trainer.main(recipe["DEFAULTS"], argv, smoke=recipe["SMOKE"]) == 0
    run_dir = root / run_name
    assert (run_dir / "final" / "config.json").is_file()
    return run_dir


# the MPT recipes' runs add ~70 s of notebook kernels: slow (the full suite runs them)
PARAMS = [
    pytest.param(r, id=r[0].removesuffix(".py"), marks=[pytest.mark.slow] if "mpt" in r[0] else [])
    for r in RECIPES
]


@pytest.fixture(scope="module", params=PARAMS)
def tiny_run(request, tmp_path_factory) -> Path:
    script, run_name = request.param
    return recipe_smoke_run(script, tmp_path_factory.mktemp("runs"), run_name)


def metric_lines(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a run, read with plain json: the reference for the report."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "eval_loss" not in r], [r for r in rows if "eval_loss" in r]


def execute(path: Path, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    """Run a notebook from sft/ in the kernel "python3".

    The venv's kernelspec says ``python``; jupyter_client starts that as ``sys.executable``, so the
    kernel is this interpreter (the venv's) whatever else is on PATH. The env is set before start.
    """
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_committed_notebooks_carry_no_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stale outputs"


def test_runs_report_notebook(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    nb = execute(
        REPO / "sft" / "runs_report.ipynb",
        {"SFT_RUNS": str(tiny_run.parent / "*"), "SFT_REPORT_DIR": str(out), "SFT_INCLUDE_SMOKE": "1"},
        monkeypatch,
    )
    for png in (
        tiny_run / "report_loss_step.png",
        tiny_run / "report_loss_tokens.png",
        out / "report_compare_step.png",
        out / "report_compare_tokens.png",
        out / "report_eval.png",
    ):
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    table = report.pd.read_csv(out / "report_throughput.csv", index_col="run")
    assert list(table.index) == [tiny_run.name]
    row = table.loc[tiny_run.name]
    train, evals = metric_lines(tiny_run)
    assert row["steps"] == len(train) == 3  # the recipe's smoke mode runs 3 steps
    assert row["tokens"] == train[-1]["tokens_processed"]
    assert row["tokens_supervised"] == train[-1]["tokens_supervised"]
    # medians skip the first (warm-up) step
    assert row["tokens_per_s"] == pytest.approx(
        statistics.median(r["tokens_per_s"] for r in train[1:]), rel=1e-12
    )
    assert row["first_eval_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-12)
    assert row["last_eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-12)
    assert row["last_eval_loss"] < row["first_eval_loss"]  # 3 steps at lr 1e-3 do move a tiny model
    text = outputs_text(nb)
    assert tiny_run.name in text and "report_loss_tokens.png" in text
    # the side-by-side plots are displayed, not only saved
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_samples_notebook(tiny_run, monkeypatch):
    nb = execute(
        REPO / "sft" / "samples.ipynb",
        {"SFT_RUN_DIR": str(tiny_run), "SFT_MAX_NEW_TOKENS": "6"},
        monkeypatch,
    )
    rows = [json.loads(x) for x in (tiny_run / "report_fixed_prompts.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [p["name"] for p in report.FIXED_PROMPTS]
    assert [r["prompt"] for r in rows] == [p["messages"][-1]["content"] for p in report.FIXED_PROMPTS]
    # "before" is the base re-made from the run's config (same seed), asked with final/'s template;
    # "after" is final/; both recomputed here through the library and compared word for word
    final, final_tok = report.load_model_and_tokenizer(tiny_run / "final")
    base, tok = report.load_model_and_tokenizer(report.run_config(tiny_run))
    kw = dict(max_new_tokens=6, chat_template=final_tok.chat_template)
    want_before = report.answer_prompts(None, report.FIXED_PROMPTS, model=base, tokenizer=tok, **kw)
    want_after = report.answer_prompts(None, report.FIXED_PROMPTS, model=final, tokenizer=final_tok, **kw)
    assert [r["before"] for r in rows] == [w["answer"] for w in want_before]
    assert [r["after"] for r in rows] == [w["answer"] for w in want_after]
    text = outputs_text(nb)
    assert "=== follow-up: And roughly how many people live there?" in text
    trainer_samples = report.read_samples(tiny_run)
    assert len(trainer_samples) == 1  # the smoke recipe asks num_samples=1
    assert trainer_samples["prompt"].iloc[0] in text


def test_runs_report_defaults_write_no_committed_file(tmp_path, monkeypatch):
    """Run with its defaults in a copy of the repository's layout: the committed ``runs/report_*`` files are
    not rewritten (the comparison goes to the git-ignored ``reports/runs_report/``) and smoke runs are left
    out of it."""
    import shutil

    fake = tmp_path / "repo"
    (fake / "sft").mkdir(parents=True)
    for f in (
        REPO / "sft"
    ).iterdir():  # the package itself, linked file by file so the kernel's cwd is fake/sft
        if f.suffix in (".py", ".ipynb") or (f / "__init__.py").is_file():  # modules, notebooks and the wings
            (fake / "sft" / f.name).symlink_to(f)
    real = "20261130-060358_smollm2-135m-instruct_guanaco-1k"  # a committed CPU run
    (fake / "runs" / real).mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json"):
        shutil.copy(REPO / "runs" / real / name, fake / "runs" / real / name)
    smoke = fake / "runs" / "20250101-000000_tiny-llama_bundled"
    smoke.mkdir()
    shutil.copy(REPO / "runs" / real / "metrics.jsonl", smoke / "metrics.jsonl")
    (smoke / "config.json").write_text(json.dumps({"config": {"model": "tiny-llama", "smoke": True}}))
    (fake / "runs" / "2026-11-30_h200_benchmark").mkdir()  # a benchmark folder: no metrics.jsonl
    for k in ("SFT_RUNS", "SFT_REPORT_DIR", "SFT_INCLUDE_SMOKE"):
        monkeypatch.delenv(k, raising=False)
    execute(fake / "sft" / "runs_report.ipynb", {}, monkeypatch)

    out = fake / "reports" / "runs_report"
    assert sorted(p.name for p in out.iterdir()) == [
        "report_compare_step.png",
        "report_compare_tokens.png",
        "report_eval.png",
        "report_throughput.csv",
    ]
    assert list(report.pd.read_csv(out / "report_throughput.csv", index_col="run").index) == [real]
    assert not list((fake / "runs").glob("report_*"))  # nothing written beside the runs
    assert not list(smoke.glob("report_*"))  # the smoke run is not part of the report
    assert (fake / "runs" / real / "report_loss_step.png").read_bytes()[:8] == PNG_MAGIC
