"""The postprocessing notebooks run headless (nbclient) against a tiny run made here, and are committed clean."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from sft import report

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [REPO / "sft" / "runs_report.ipynb", REPO / "sft" / "samples.ipynb"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_NAME = "20250101-000000_tiny-llama_bundled"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder laid out by sft/runs.py: config.json, metrics.jsonl, final/ of a tiny-llama.

    Written with the run-folder writer's own functions; the weights of final/ are the seeded
    initial weights nudged, so "before" and "after" are different models.
    """
    import torch

    from sft import models, runs
    from sft.config import TrainConfig

    root = tmp_path_factory.mktemp("runs")
    run_dir = runs.create_run_dir(root, RUN_NAME)
    cfg = TrainConfig(model="tiny-llama", data="bundled", max_len=128, seed=0)
    (run_dir / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "model": {"name": cfg.model}}))
    w = runs.MetricsWriter(run_dir, tensorboard=False)
    w.eval({"step": 0, "epoch": 0.0, "eval_loss": 5.6, "eval_tokens_supervised": 300})
    for step in (1, 2, 3):
        w.train(
            {
                "step": step,
                "epoch": step / 3,
                "loss": 5.5 - 0.5 * step,
                "lr": 1e-3,
                "grad_norm": 2.0,
                "step_tokens_processed": 256,
                "step_tokens_nonpad": 200,
                "step_tokens_supervised": 100,
                "tokens_processed": 256 * step,
                "tokens_nonpad": 200 * step,
                "tokens_supervised": 100 * step,
                "tokens_per_s": 1000.0 + step,
                "mfu": None,
                "peak_mem_gib": 0.5,
                "step_time_s": 0.25,
            }
        )
    w.eval({"step": 3, "epoch": 1.0, "eval_loss": 4.1, "eval_tokens_supervised": 300})
    model, tok = models.load_model_and_tokenizer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    runs.save_final(run_dir, model, tok)
    return run_dir


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
        {"SFT_RUNS": str(tiny_run.parent / "*"), "SFT_REPORT_DIR": str(out)},
        monkeypatch,
    )
    for png in (
        tiny_run / "report_loss_step.png",
        tiny_run / "report_loss_tokens.png",
        out / "report_compare_step.png",
        out / "report_compare_tokens.png",
    ):
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    table = report.pd.read_csv(out / "report_throughput.csv", index_col="run")
    assert list(table.index) == [RUN_NAME]
    row = table.loc[RUN_NAME]
    assert (row["steps"], row["tokens"], row["tokens_supervised"]) == (3, 768, 300)
    assert row["tokens_per_s"] == 1002.5  # median of steps 2 and 3 (step 1 is warm-up)
    assert (row["first_eval_loss"], row["last_eval_loss"]) == (5.6, 4.1)
    text = outputs_text(nb)
    assert RUN_NAME in text and "report_loss_tokens.png" in text
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
    # "before" is the base re-made from the run's config (same seed), asked with final/'s template
    from transformers import AutoTokenizer

    base, tok = report.load_model_and_tokenizer(report.run_config(tiny_run))
    final_tok = AutoTokenizer.from_pretrained(tiny_run / "final")
    want = report.answer_prompts(
        None,
        report.FIXED_PROMPTS,
        max_new_tokens=6,
        model=base,
        tokenizer=tok,
        chat_template=final_tok.chat_template,
    )
    assert [r["before"] for r in rows] == [w["answer"] for w in want]
    assert [r["before"] for r in rows] != [r["after"] for r in rows]
    assert "=== follow-up: And roughly how many people live there?" in outputs_text(nb)
