"""sft/report.py against small synthetic run folders (metrics keys as sft/training/runs.py writes them)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from sft import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, name: str, lines: list[dict], config: dict | None = None, tail: str = "") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config or {"model": "tiny-llama", "data": "bundled"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    return run


def train_line(step, loss, tok, tps, mem, dt, mfu=None):
    """A train line with exactly the keys sft/training/runs.py writes (step_* are per step, tokens_* cumulative)."""
    return {
        "step": step,
        "epoch": step / 4,
        "loss": loss,
        "lr": 1e-4,
        "grad_norm": 1.0,
        "step_tokens_processed": 100,
        "step_tokens_nonpad": 90,
        "step_tokens_supervised": 50,
        "tokens_processed": tok,
        "tokens_nonpad": tok * 9 // 10,
        "tokens_supervised": tok // 2,
        "tokens_per_s": tps,
        "mfu": mfu,
        "mfu_nonpad": mfu,
        "peak_mem_gib": mem,
        "step_time_s": dt,
    }


def test_synthetic_lines_match_the_writer():
    from sft.training import runs

    assert tuple(train_line(1, 1.0, 1, 1.0, 1.0, 1.0)) == runs.TRAIN_KEYS
    assert set(runs.EVAL_KEYS) >= {"step", "eval_loss"}


@pytest.fixture
def two_runs(tmp_path):
    a = [
        {"step": 0, "eval_loss": 3.0},
        train_line(1, 2.9, 100, 10.0, 1.0, 9.0, 0.1),  # warm-up step: slow, excluded from medians
        train_line(2, 2.5, 200, 50.0, 1.5, 2.0, 0.3),
        {"step": 2, "eval_loss": 2.6},
        train_line(3, 2.2, 300, 40.0, 1.2, 2.5, 0.2),
        train_line(4, 2.0, 400, 60.0, 1.1, 1.5, 0.4),
        {"step": 4, "eval_loss": 2.1},
    ]
    b = [train_line(1, 5.0, 64, 5.0, 0.5, 4.0), train_line(2, 4.0, 128, 8.0, 0.25, 3.0)]
    write_run(tmp_path, "20250101T000000Z_a", a)
    write_run(tmp_path, "20250102T000000Z_b", b)
    return tmp_path


def test_load_runs_rows_kinds_and_tokens(two_runs):
    df = report.load_runs(str(two_runs / "*"))
    assert list(df["run"]) == ["20250101T000000Z_a"] * 7 + ["20250102T000000Z_b"] * 2
    assert list(df["kind"]) == ["eval", "train", "train", "eval", "train", "train", "eval", "train", "train"]
    # eval lines take the cumulative count of the train step they follow (0 before any step)
    assert list(df["tokens"]) == [0, 100, 200, 200, 300, 400, 400, 64, 128]
    assert df["run_dir"].iloc[0] == str(two_runs / "20250101T000000Z_a")
    # the same from a list of folders, and from one folder
    assert len(report.load_runs([two_runs / "20250102T000000Z_b"])) == 2
    assert len(report.load_runs(two_runs / "20250101T000000Z_a")) == 7


def test_tokens_from_per_step_counts(tmp_path):
    lines = [{"step": s, "loss": 1.0, "step_tokens_processed": 10 * s} for s in (1, 2, 3)]
    write_run(tmp_path, "r", lines + [{"step": 3, "eval_loss": 0.5}])
    df = report.load_runs(tmp_path / "r")
    assert list(df["tokens"]) == [10, 30, 60, 60]


def test_no_token_count_gives_nan_and_step_plot_only(tmp_path):
    write_run(tmp_path, "r", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}])
    df = report.load_runs(tmp_path / "r")
    assert df["tokens"].isna().all()
    assert df["eval_loss"].isna().all()  # column exists even when no eval ran
    with pytest.raises(ValueError, match="token count"):
        report.plot_loss(df, tmp_path / "x.png", x="tokens")
    assert [p.name for p in report.save_run_plots(df)] == ["report_loss_step.png"]


def test_malformed_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path, "r", [{"step": 1, "loss": 1.0}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{oops\n" + json.dumps({"step": 2, "loss": 0.5}) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        report.load_runs(run)


def test_truncated_last_line_is_skipped(tmp_path, caplog):
    run = write_run(tmp_path, "r", [{"step": 1, "loss": 1.0}], tail='{"step": 2, "lo')
    df = report.load_runs(run)
    assert list(df["step"]) == [1]
    assert "truncated last line" in caplog.text


def test_missing_and_unmatched(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="no run folder matches"):
        report.load_runs(str(tmp_path / "nothing*"))
    (tmp_path / "notarun").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        report.load_runs(tmp_path / "notarun")
    # through a glob, a folder without metrics is skipped (a run that failed early), not fatal
    write_run(tmp_path, "r", [{"step": 1, "loss": 1.0}])
    assert list(report.load_runs(str(tmp_path / "*"))["run"]) == ["r"]
    assert "notarun: no metrics.jsonl, skipped" in caplog.text


def test_null_losses_keep_their_kind(tmp_path):
    # sft/training/runs.py writes a non-finite loss as null: the line stays what it was
    write_run(tmp_path, "r", [{"step": 1, "loss": None}, {"step": 1, "eval_loss": None}])
    df = report.load_runs(tmp_path / "r")
    assert list(df["kind"]) == ["train", "eval"]
    assert df[["loss", "eval_loss"]].isna().all().all()


def test_plot_loss_writes_png_with_one_line_per_run_and_kind(two_runs, tmp_path):
    df = report.load_runs(str(two_runs / "*"))
    out = tmp_path / "plots" / "loss_tokens.png"
    fig = report.plot_loss(df, out, x="tokens")
    assert out.read_bytes()[:8] == PNG_MAGIC
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == [
        "20250101T000000Z_a train",
        "20250101T000000Z_a eval",
        "20250102T000000Z_b train",
    ]
    assert list(lines[0].get_xdata()) == [100, 200, 300, 400]
    assert list(lines[1].get_xdata()) == [0, 200, 400]
    assert list(lines[1].get_ydata()) == [3.0, 2.6, 2.1]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    fig = report.plot_loss(df, None, x="step")
    assert list(fig.axes[0].get_lines()[2].get_xdata()) == [1, 2]
    with pytest.raises(ValueError, match="x must be"):
        report.plot_loss(df, None, x="epoch")


def test_save_run_plots_beside_each_run(two_runs):
    df = report.load_runs(str(two_runs / "*"))
    written = report.save_run_plots(df)
    assert sorted(str(p.relative_to(two_runs)) for p in written) == [
        "20250101T000000Z_a/report_loss_step.png",
        "20250101T000000Z_a/report_loss_tokens.png",
        "20250102T000000Z_b/report_loss_step.png",
        "20250102T000000Z_b/report_loss_tokens.png",
    ]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in written)


def test_throughput_table_pinned(two_runs):
    t = report.throughput_table(str(two_runs / "*"))
    assert list(t.index) == ["20250101T000000Z_a", "20250102T000000Z_b"]
    a = t.loc["20250101T000000Z_a"]
    assert a["steps"] == 4 and a["tokens"] == 400
    assert (a["tokens_nonpad"], a["tokens_supervised"]) == (360, 200)
    # medians skip the first (warm-up) step; memory is the max over all steps after it
    assert a["tokens_per_s"] == 50.0 and a["mfu"] == 0.3 and a["step_time_s"] == 2.0
    assert a["peak_mem_gib"] == 1.5
    assert (a["first_loss"], a["last_loss"]) == (2.9, 2.0)
    assert (a["first_eval_loss"], a["last_eval_loss"]) == (3.0, 2.1)
    assert a["wall_s"] == 15.0
    b = t.loc["20250102T000000Z_b"]
    assert b["tokens_per_s"] == 8.0 and b["peak_mem_gib"] == 0.25
    assert math.isnan(b["mfu"]) and math.isnan(b["last_eval_loss"])


def test_fixed_prompts_cover_the_five_kinds():
    assert [p["name"] for p in report.FIXED_PROMPTS] == ["list", "logic", "email", "recipe", "follow-up"]
    for p in report.FIXED_PROMPTS:
        roles = [m["role"] for m in p["messages"]]
        assert roles[-1] == "user" and set(roles) <= {"user", "assistant", "system"}
    assert [m["role"] for m in report.FIXED_PROMPTS[-1]["messages"]] == ["user", "assistant", "user"]


def test_read_samples(tmp_path):
    run = write_run(tmp_path, "r", [])
    assert list(report.read_samples(run).columns) == ["prompt", "reference", "before", "after"]
    lines = [
        {"stage": "before", "step": 0, "prompt": "p1", "reference": "r1", "answer": "b1", "new_tokens": 2},
        {"stage": "before", "step": 0, "prompt": "p2", "reference": "r2", "answer": "b2", "new_tokens": 2},
        {"stage": "after", "step": 3, "prompt": "p1", "reference": "r1", "answer": "a1", "new_tokens": 2},
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = report.read_samples(run)
    assert got[["prompt", "reference", "before"]].to_dict("list") == {
        "prompt": ["p1", "p2"],
        "reference": ["r1", "r2"],
        "before": ["b1", "b2"],
    }
    assert got["after"].iloc[0] == "a1"
    assert got["after"].isna().tolist() == [False, True]


def test_run_config_and_base_model(tmp_path):
    run = write_run(tmp_path, "r", [], config={"git": "abc", "config": {"model": "some/model", "seed": 3}})
    assert report.run_config(run) == {"model": "some/model", "seed": 3}
    assert report.base_model_of(run) == "some/model"
    run = write_run(tmp_path, "f", [], config={"model": "tiny-llama", "seed": 1})
    assert report.base_model_of(run) == "tiny-llama"
    run = write_run(tmp_path, "s", [], config={"lr": 1})
    with pytest.raises(KeyError, match="names no base model"):
        report.base_model_of(run)


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_answer_prompts_is_greedy_over_the_chat_template(tmp_path, neox_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(neox_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    tok = copy.deepcopy(neox_tokenizer)  # the fixture is shared by the session: leave it untouched
    tok.chat_template = TEMPLATE
    model.save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")

    prompts = report.FIXED_PROMPTS[-1:]
    got = report.answer_prompts(tmp_path / "final", prompts, max_new_tokens=6)
    assert len(got) == 1 and got[0]["name"] == "follow-up"
    assert got[0]["prompt"] == "And roughly how many people live there?"
    assert got[0]["prompt_text"] == (
        "<|user|>What is the capital of France?<|endoftext|><|assistant|>The capital of France is Paris."
        "<|endoftext|><|user|>And roughly how many people live there?<|endoftext|><|assistant|>"
    )
    # the reference: argmax of a full forward pass, token by token
    ids = tok(got[0]["prompt_text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == 0:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert got[0]["new_tokens"] == len(new)
    assert got[0]["answer"] == tok.decode(new, skip_special_tokens=True).strip()

    # a template passed in wins over the tokenizer's own (before and after see the same text)
    other = report.answer_prompts(
        None,
        prompts,
        max_new_tokens=2,
        model=model,
        tokenizer=tok,
        chat_template="{{ messages[-1]['content'] }}|",
    )
    assert other[0]["prompt_text"] == "And roughly how many people live there?|"

    table = report.compare_answers(got, got)
    assert list(table.columns) == ["name", "prompt", "before", "after"]
    with pytest.raises(ValueError, match="different prompts"):
        report.compare_answers(got, [])


def test_select_runs_leaves_smoke_runs_out_unless_asked(tmp_path):
    line = [train_line(1, 2.0, 100, 10.0, 1.0, 1.0)]
    real = write_run(tmp_path, "a_real", line, config={"config": {"model": "smollm2-135m-instruct"}})
    smoke = write_run(tmp_path, "b_smoke", line, config={"config": {"model": "some/model", "smoke": True}})
    tiny = write_run(tmp_path, "c_tiny", line, config={"config": {"model": "tiny-mpt", "smoke": False}})
    (tmp_path / "d_benchmark").mkdir()  # runs/ also holds benchmark folders: no metrics.jsonl
    assert [report.is_smoke_run(p) for p in (real, smoke, tiny)] == [False, True, True]
    assert report.select_runs(tmp_path / "*") == [real]
    assert report.select_runs(tmp_path / "*", include_smoke=True) == [real, smoke, tiny]
    assert report.select_runs([smoke]) == [smoke]  # named one by one: kept
    with pytest.raises(FileNotFoundError, match=r"2 smoke run\(s\), left out"):
        report.select_runs(str(tmp_path / "[bc]_*"))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        report.select_runs([tmp_path / "d_benchmark"])


def test_answer_prompts_on_our_fast_mpt_matches_a_full_forward():
    """Our MPT (sft/model/mpt.py) has no ``generate``: answers come from sft.model.generate, greedy, stopping at EOS."""
    import torch

    from sft.config import TrainConfig
    from sft.model.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(TrainConfig(model="tiny-mpt", mpt_impl="fast"))
    model.eval()
    assert not hasattr(model, "generate")
    prompts = report.FIXED_PROMPTS[:2]
    got = report.answer_prompts(None, prompts, max_new_tokens=5, model=model, tokenizer=tok)
    assert [g["name"] for g in got] == [p["name"] for p in prompts]
    for g in got:
        ids = tok(g["prompt_text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(ids)[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert g["new_tokens"] == len(new)
        assert g["answer"] == tok.decode(new, skip_special_tokens=True).strip()


def test_eval_table_per_source_loss_accuracy_and_stop_rate(tmp_path):
    """eval_table: one row per evaluation, the per-source losses as columns, accuracy and stop rate; a run
    without those metrics gives NaN; plot_eval writes a PNG."""
    new, old = tmp_path / "new", tmp_path / "old"
    for d in (new, old):
        d.mkdir()
    lines = [
        {"step": 0, "eval_loss": 3.0, "eval_tokens_supervised": 10, "eval_token_accuracy": 0.1,
         "eval_stop_rate": 0.0, "eval_loss_by_source": {"a": 2.0, "b": 4.0}},
        train_line(1, 2.5, 100, 10.0, 1.0, 1.0),
        {"step": 1, "eval_loss": 2.0, "eval_tokens_supervised": 10, "eval_token_accuracy": 0.4,
         "eval_stop_rate": 0.75, "eval_loss_by_source": {"a": 1.5, "b": 2.5}},
    ]  # fmt: skip
    (new / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (old / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 5.0}) + "\n")
    df = report.load_runs([new, old])
    t = report.eval_table(df)
    assert list(t["run"]) == ["new", "new", "old"]
    assert list(t["loss[a]"][:2]) == [2.0, 1.5] and list(t["loss[b]"][:2]) == [4.0, 2.5]
    assert list(t["eval_stop_rate"][:2]) == [0.0, 0.75] and list(t["eval_token_accuracy"][:2]) == [0.1, 0.4]
    assert math.isnan(t["eval_stop_rate"][2]) and math.isnan(t["loss[a]"][2])
    report.plot_eval(df, tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- issue 26: committed runs, parameters


def _git(cwd, *args):
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": __import__("os").environ["PATH"], "HOME": str(cwd)}  # fmt: skip
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def test_committed_run_plots_and_answers_are_not_rewritten(two_runs, tmp_path):
    """Issue 26's data-loss case: runs_report.ipynb rewrote the report plots inside every run folder it
    matched, committed ones included. A committed run's files stay byte for byte; its plots go to
    reports/<run>/; an uncommitted run still gets them beside it."""
    repo = two_runs
    committed = repo / "20250101T000000Z_a"
    (committed / "report_loss_step.png").write_bytes(b"committed plot")
    _git(repo, "init", "-q")
    _git(repo, "add", committed.name)
    _git(repo, "commit", "-qm", "a committed run")
    before = {p: p.read_bytes() for p in committed.iterdir()}
    df = report.load_runs(repo / "*")
    written = report.save_run_plots(df, repo=repo)
    assert {p: p.read_bytes() for p in committed.iterdir()} == before
    assert sorted(str(p.relative_to(repo)) for p in written) == [
        "20250102T000000Z_b/report_loss_step.png",
        "20250102T000000Z_b/report_loss_tokens.png",
        "reports/20250101T000000Z_a/report_loss_step.png",
        "reports/20250101T000000Z_a/report_loss_tokens.png",
    ]
    assert report.output_path(committed, "report_fixed_prompts.jsonl", repo) == (
        repo / "reports" / committed.name / "report_fixed_prompts.jsonl"
    )
    other = repo / "20250102T000000Z_b"
    assert report.output_path(other, "x.jsonl", repo) == other / "x.jsonl"


def test_notebook_parameters_bad_values_are_one_line(tmp_path, monkeypatch):
    repo = tmp_path
    run = write_run(repo / "runs", "20250101-000000_x", [train_line(1, 2.0, 10, 1.0, 1.0, 1.0)])
    cases = [
        ("runs/nope", "SFT_RUN_DIR=runs/nope: ", "does not exist"),
        (str(run / "metrics.jsonl"), "SFT_RUN_DIR=", "is not a folder"),
        (str(repo), "SFT_RUN_DIR=", "is not a run folder (no config.json)"),
        (str(run), "SFT_RUN_DIR=", "has no final/ model"),
    ]
    for value, start, cause in cases:
        with pytest.raises(report.NotebookInputError) as e:
            report.samples_run_dir(value, repo)
        msg = str(e.value)
        assert msg.startswith(start) and cause in msg and "\n" not in msg
        assert e.value._render_traceback_() == [f"error: {msg}"]  # what Jupyter shows: one line
    with pytest.raises(
        report.NotebookInputError, match=r"no run folder with final/ under .*: set SFT_RUN_DIR"
    ):
        report.samples_run_dir(None, repo)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert report.samples_run_dir("runs/20250101-000000_x/final", repo) == run  # final/ means its run
    assert report.samples_run_dir(None, repo) == run
    with pytest.raises(report.NotebookInputError, match=r"^SFT_RUNS=runs/zzz\*: no run folder"):
        report.report_runs("runs/zzz*", repo)
    assert report.report_runs("runs/*", repo, include_smoke=True) == [run]
    for raw, cause in (("abc", "expected an integer"), ("0", "must be >= 1")):
        monkeypatch.setenv("SFT_MAX_NEW_TOKENS", raw)
        with pytest.raises(report.NotebookInputError, match=f"^SFT_MAX_NEW_TOKENS={raw}: {cause}"):
            report.env_int("SFT_MAX_NEW_TOKENS", 128)
    monkeypatch.delenv("SFT_MAX_NEW_TOKENS")
    assert report.env_int("SFT_MAX_NEW_TOKENS", 128) == 128
