"""A user's first hour (issue 20, items 3 and 4): every entry point answers bad input with one ``error:``
line on stderr and exit status 2, no traceback, nothing written; values that make no sense are refused;
data files as Windows tools write them are read."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.config import ConfigError, TrainConfig, check_config, parse_args
from sft.data.schema import DataError
from sft.data.sources import load_rows
from sft.training import trainer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on the shared 2-core box
    yield
    torch.set_num_threads(n)


def _one_error_line(err: str) -> str:
    """The single ``error:`` line of ``err`` (third-party warnings aside), and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- sft.chat


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run-like folder: metrics.jsonl and a final/ (tiny Llama + byte tokenizer, guanaco template)."""
    from sft.data.render import attach_template
    from sft.model.models import byte_tokenizer, tiny_model

    tok = byte_tokenizer()
    attach_template(tok, "guanaco")
    run = tmp_path_factory.mktemp("runs") / "20250101-000000_tiny-llama_bundled"
    model = tiny_model("tiny-llama", len(tok), seed=0, max_len=256)
    model.save_pretrained(str(run / "final"))
    tok.save_pretrained(str(run / "final"))
    (run / "metrics.jsonl").write_text("")
    return run


@pytest.fixture(scope="module")
def pickle_only(run_dir, tmp_path_factory):
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("pickle") / "model"
    shutil.copytree(run_dir / "final", d)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def _chat(capsys, *argv):
    from sft.chat import cli

    rc = cli([*argv, "--once", "hi", "--max_new_tokens=2", "--device=cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_chat_on_a_run_folder_says_did_you_mean_final(run_dir, capsys):
    rc, out, err = _chat(capsys, str(run_dir))
    assert rc == 2 and out == ""
    assert (
        _one_error_line(err)
        == f"error: {run_dir} is a run folder, not a model: did you mean {run_dir}/final?"
    )
    rc, out, _ = _chat(capsys, str(run_dir / "final"))  # what it suggests works
    assert rc == 0 and out.endswith("\n")


def test_chat_on_a_missing_model(tmp_path, capsys):
    rc, _, err = _chat(capsys, str(tmp_path / "no-such-model"))
    assert rc == 2 and "no-such-model" in _one_error_line(err)
    rc, _, err = _chat(capsys, "no-such-org/no-such-model")  # a hub id neither cached nor reachable
    assert rc == 2 and "no-such-org/no-such-model" in _one_error_line(err)


def test_chat_on_a_pickle_only_folder_names_the_flag_it_accepts(pickle_only, capsys):
    rc, _, err = _chat(capsys, str(pickle_only))
    assert rc == 2 and "only pickle weights" in _one_error_line(err) and "--allow_pickle" in err
    rc, out, _ = _chat(capsys, str(pickle_only), "--allow_pickle")  # and chat accepts that flag
    assert rc == 0 and out.endswith("\n")


def test_chat_with_a_broken_template(run_dir, capsys):
    rc, _, err = _chat(capsys, str(run_dir / "final"), "--template={% for %}")
    assert rc == 2 and "chat template refused or failed (TemplateSyntaxError" in _one_error_line(err)


def test_chat_command_line_exits_2_with_one_line(run_dir):
    p = subprocess.run(
        [sys.executable, "-m", "sft.chat", str(run_dir), "--once", "hi"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert "did you mean" in _one_error_line(p.stderr)


# ----------------------------------------------------------------------------- inf_tests.latency


def test_latency_on_a_missing_model_is_one_line_and_writes_nothing(tmp_path, run_dir, capsys):
    from inf_tests.latency import cli

    out = tmp_path / "results"
    args = ["--prompt_lens=8", "--batches=1", "--new_tokens=2", "--copy_mib=1", f"--out={out}"]
    assert cli([f"--model={tmp_path / 'missing'}", *args]) == 2
    assert "missing" in _one_error_line(capsys.readouterr().err)
    assert cli([f"--model={run_dir}", *args]) == 2
    assert f"did you mean {run_dir}/final" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()  # no results folder for a run that never started


def test_latency_command_line_exits_2_with_one_line(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "inf_tests.latency",
            f"--model={tmp_path / 'missing'}",
            f"--out={tmp_path / 'r'}",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "missing" in _one_error_line(p.stderr)
    assert not (tmp_path / "r").exists()


def test_latency_never_rewrites_results_already_there(tmp_path, capsys):
    """Issue 26: the README's CPU command rewrote the committed results. A folder holding results.json is
    refused (before any model loads) unless --force; the README's command now writes into reports/."""
    from inf_tests.latency import cli

    out = tmp_path / "committed"
    out.mkdir()
    for name in ("results.json", "table.txt", "latency.png"):
        (out / name).write_text(f"committed {name}")
    args = ["--model=tiny-llama", "--prompt_lens=8", "--batches=1", "--new_tokens=2", "--warmup=0",
            "--repeats=1", "--copy_mib=1", "--paths=fast", f"--out={out}"]  # fmt: skip
    assert cli(args) == 2
    assert "already holds results" in _one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: f"committed {n}" for n in
                                                              ("results.json", "table.txt", "latency.png")}  # fmt: skip
    assert cli([*args, "--force"]) == 0 and json.loads((out / "results.json").read_text())["decode"]
    readme = (REPO / "inf_tests" / "README.md").read_text()
    cpu = readme[readme.index("python -m inf_tests.latency --model=smollm2-135m-instruct") :].split("```")[0]
    assert "--out=reports/" in cpu and "inf_tests/results" not in cpu


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--new_tokens=0"], "argument --new_tokens: must be >= 2, got 0"),
        (["--prompt_lens=0"], "argument --prompt_lens: must be >= 1, got 0"),
        (["--batches=-1"], "argument --batches: must be >= 1, got -1"),
        (["--threads=-1"], "argument --threads: must be >= 0, got -1"),
        (["--prompt_lens=100000"], "tiny-llama has 4096 positions; these options need 100001"),
    ],
)
def test_latency_options_out_of_range_one_line(argv, message, tmp_path, capsys):
    from inf_tests.latency import cli

    assert cli(["--model=tiny-llama", f"--out={tmp_path / 'r'}", "--copy_mib=1", *argv]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- values that make no sense


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--lr=nan", "--lr=nan: must be a finite number"),
        ("--lr=inf", "--lr=inf: must be a finite number"),
        ("--grad_clip=-inf", "--grad_clip=-inf: must be a finite number"),
        ("--betas=0.9,nan", "--betas=0.9,nan: must be a finite number"),
        ("--eval_size=nan", "--eval_size=nan: must be a finite number"),
        ("--epochs=0", "--epochs=0: must be > 0 (to run a fixed number of steps, use --max_steps)"),
        ("--epochs=-1", "--epochs=-1: must be > 0"),
        ("--limit=-1", "--limit=-1: must be >= 1 (leave it out to use every row)"),
        ("--limit=0", "--limit=0: must be >= 1"),
        ("--run_name=", "--run_name=: expected a folder name (leave it out for a generated one)"),
    ],
)
def test_senseless_values_are_refused_by_the_recipe_in_one_line(tmp_path, capsys, arg, message):
    rc = trainer.main(TrainConfig(), ["--model=tiny-llama", f"--out_dir={tmp_path / 'runs'}", arg])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_the_same_rules_hold_for_a_config_built_in_python():
    for kw in (dict(lr=float("nan")), dict(epochs=0.0), dict(limit=-1), dict(betas=(0.9, float("inf")))):
        with pytest.raises(ConfigError):
            check_config(TrainConfig(**kw))
    check_config(TrainConfig(epochs=0.0, max_steps=5))  # epochs is ignored when max_steps is set
    assert parse_args(["--limit=none"]).limit is None and parse_args(["--limit=3"]).limit == 3


# ----------------------------------------------------------------------------- data files


def _row(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def test_a_jsonl_file_with_a_utf8_bom_is_read(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(_row(i)) + "\n" for i in range(3)).encode())
    assert [r for _, r in load_rows(str(p))] == [_row(i) for i in range(3)]
    q = tmp_path / "bom.json"  # a .json list too
    q.write_bytes(b"\xef\xbb\xbf" + json.dumps([_row(0)]).encode())
    assert [r for _, r in load_rows(str(q))] == [_row(0)]


def test_a_bom_elsewhere_is_still_an_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes((json.dumps(_row(0)) + "\n").encode() + b"\xef\xbb\xbf" + json.dumps(_row(1)).encode())
    with pytest.raises(DataError, match=r"row 2: malformed JSON line"):
        list(load_rows(str(p)))


def test_a_bom_file_trains_through_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))  # prepared afresh, not from an earlier run
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(_row(i)) + "\n" for i in range(6)).encode())
    args = ["--model=tiny-llama", f"--data={p}", "--max_steps=1", "--eval_size=1", "--max_len=64"]
    args += [
        "--num_samples=0",
        "--no-save_final",
        "--no-progress",
        f"--out_dir={tmp_path / 'runs'}",
        "--run_name=r",
    ]
    assert trainer.main(TrainConfig(), args) == 0
    assert (tmp_path / "runs" / "r" / "metrics.jsonl").is_file()


def test_a_directory_as_data_says_it_is_a_directory(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    with pytest.raises(DataError, match=r"is a directory, not a data file"):
        load_rows(str(d))
    rc = trainer.main(TrainConfig(), ["--model=tiny-llama", f"--data={d}", f"--out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_error_line(err).startswith(f"error: {d}: is a directory, not a data file")
    assert "not found" not in err
    assert not any((tmp_path / "runs").glob("*"))  # no run folder (out_dir itself is checked writable first)


def test_a_malformed_json_line_reports_the_column_of_the_fault(tmp_path, capsys):
    good = json.dumps(_row(0))
    # 50 characters, then the line ends where a ',' or '}' is expected: the fault is at column 51
    truncated = '{"messages": [{"role": "user", "content": "' + "x" * 4 + '"}]'
    assert len(truncated) == 50
    mid = '{"messages": [], "a": 1 "b": 2}'  # the fault (a missing ',') at column 25
    p = tmp_path / "d.jsonl"
    p.write_text(f"{good}\n{truncated}\n")
    with pytest.raises(DataError, match=r"row 2: malformed JSON line: Expecting ',' delimiter at column 51$"):
        list(load_rows(str(p)))
    p.write_text(f"{good}\r\n{mid}\r\n")  # Windows line ends too
    with pytest.raises(DataError, match=r"row 2: malformed JSON line: Expecting ',' delimiter at column 25$"):
        list(load_rows(str(p)))
    p.write_text(f"{good}\n{truncated}")  # no line break at the end of the file
    rc = trainer.main(TrainConfig(), ["--model=tiny-llama", f"--data={p}", f"--out_dir={tmp_path / 'runs'}"])
    assert rc == 2 and _one_error_line(capsys.readouterr().err).endswith("at column 51")
