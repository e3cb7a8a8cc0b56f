"""One run folder, one writer; unique generated names; a run name stays inside out_dir; ``--resume=latest``
picks the newest unfinished checkpoint by time (issue 20, items 1 and 2's ``latest``)."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sft.config import ConfigError, TrainConfig, check_config, parse_args
from sft.training import checkpoints, runs, trainer
from sft.training.checkpoints import find_resume, is_finished, mark_finished
from sft.training.runs import RunError, create_run_dir, hold_run_lock

REPO = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent(
    """
    import sys, time
    from sft.training.runs import RunError, hold_run_lock
    try:
        with hold_run_lock(sys.argv[1]):
            print("held", flush=True)
            time.sleep(float(sys.argv[2]))
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    """
)


def _hold(run_dir, seconds):
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(seconds)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ----------------------------------------------------------------------------- the lock


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    run = create_run_dir(tmp_path, "r")
    with hold_run_lock(run) as lock:
        assert lock == run / ".lock" and lock.read_text().split() == [str(os.getpid())]
        other = _hold(run, 0)
        out, err = other.communicate(timeout=60)
        assert other.returncode == 2 and out == ""
        assert err.strip().splitlines() == [err.strip()]  # one line
        assert f"run folder {run} is in use by PID {os.getpid()}" in err
        # within one process too: flock locks belong to open files, not to processes
        with pytest.raises(RunError, match=f"is in use by PID {os.getpid()}"):
            with hold_run_lock(run):
                pass
    assert not (run / ".lock").exists()  # released: nothing left behind
    with hold_run_lock(run):  # and free again
        pass


def test_the_lock_of_a_killed_process_is_free_again(tmp_path):
    run = create_run_dir(tmp_path, "r")
    holder = _hold(run, 120)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunError, match=f"in use by PID {holder.pid}"):
        with hold_run_lock(run):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (run / ".lock").exists()  # a stale file with a dead PID: it blocks nothing
    with hold_run_lock(run) as lock:
        assert lock.read_text().split() == [str(os.getpid())]


def test_the_lock_is_exclusive_under_contention(tmp_path):
    """Many threads taking and releasing the lock at once (the file removed at each release): never two
    holders at the same time."""
    run = create_run_dir(tmp_path, "r")
    inside, overlaps, taken = [0], [0], [0]
    guard = threading.Lock()

    def worker():
        for _ in range(200):
            try:
                with hold_run_lock(run):
                    with guard:
                        inside[0] += 1
                        overlaps[0] += inside[0] > 1
                        taken[0] += 1
                    time.sleep(0.0005)
                    with guard:
                        inside[0] -= 1
            except RunError:
                pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 0 and taken[0] > 0


# ----------------------------------------------------------------------------- names


def test_generated_names_started_in_the_same_second_do_not_collide(tmp_path):
    name = runs.run_name("tiny-llama", "bundled")
    made = []

    def make():
        made.append(create_run_dir(tmp_path, name, unique=True))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in made}) == 8 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made) == sorted([name] + [f"{name}-{k}" for k in range(2, 9)])
    with pytest.raises(RunError, match="already exists; pick another --run_name"):
        create_run_dir(tmp_path, name)  # a name the user chose is never changed behind their back


@pytest.mark.parametrize("name", ["../../x", "a/b", "", " ", "..", ".", ".hidden", "a\\b", "x\ny", "a" * 201])
def test_a_run_name_is_one_folder_name(tmp_path, name):
    with pytest.raises(RunError, match="cannot name a run folder"):
        create_run_dir(tmp_path / "out", name)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError) as e:
        parse_args([f"--run_name={name}"])
    assert "\n" not in str(e.value).replace("\\n", "")
    with pytest.raises(ConfigError):
        check_config(TrainConfig(run_name=name))  # a config built in Python is checked too


def test_run_name_outside_out_dir_is_refused_by_the_recipe_entry_point(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    rc = trainer.main(TrainConfig(), ["--model=tiny-llama", f"--out_dir={out}", "--run_name=../../x"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: --run_name='../../x' cannot name a run folder") and err.count("\n") == 1
    assert not tmp_path.joinpath("x").exists() and not out.exists()


def test_good_run_names_pass():
    for name in ("r", "my-run_2.1", "20250101-120000_tiny-llama_bundled", "ünï"):
        assert parse_args([f"--run_name={name}"]).run_name == name


# ----------------------------------------------------------------------------- resume=latest


def _ckpt(run, step, when, **state):
    c = run / "checkpoints" / f"step_{step:07d}"
    c.mkdir(parents=True)
    (c / "state.json").write_text(json.dumps({"step": step, **state}))
    os.utime(c / "state.json", (when, when))
    return c


def _fake_run(out, name, steps, when):
    run = out / name
    for k, s in enumerate(steps):
        c = _ckpt(run, s, when - 10 * (len(steps) - 1 - k))
    return run, c


def test_latest_is_the_newest_unfinished_checkpoint_by_time_not_by_name(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(
        checkpoints, "checkpoint_problem", lambda c: None
    )  # the layout, not the file contents
    now = time.time()
    old_custom, _ = _fake_run(tmp_path, "zzz-my-run", [1, 2], now - 3000)  # sorts last by name, oldest
    newest, newest_ckpt = _fake_run(tmp_path, "20250101-000000_tiny_bundled", [3], now - 1000)
    done, _ = _fake_run(tmp_path, "20250102-000000_tiny_bundled", [4], now - 10)  # newest of all, finished
    mark_finished(done, 4)
    (tmp_path / "not-a-run").mkdir()
    with caplog.at_level(logging.INFO, logger="sft.training.checkpoints"):
        assert find_resume(tmp_path, "latest") == (newest, newest_ckpt)
    said = caplog.text
    assert (
        f"--resume=latest: {newest}" in said
        and "step_0000003" in said
        and "1 finished run(s) skipped" in said
    )
    # a run named explicitly is resumed even if finished (e.g. to extend it)
    assert find_resume(tmp_path, str(done))[0] == done
    mark_finished(newest, 3)
    mark_finished(old_custom, 2)
    with pytest.raises(
        RunError, match=r"every run with a checkpoint in .* has finished \(newest: .*20250102"
    ):
        find_resume(tmp_path, "latest")


def test_finished_means_the_end_was_written_after_the_newest_checkpoint(tmp_path):
    now = time.time()
    run, _ = _fake_run(tmp_path, "r", [2], now - 100)
    assert not is_finished(run)
    mark_finished(run, 2)
    assert is_finished(run)
    _ckpt(run, 5, now - 50)  # resumed with more steps, then interrupted: unfinished again
    assert not is_finished(run)
    # runs from before finished.json: the "after" samples carry the step they were written at ...
    legacy, _ = _fake_run(tmp_path, "legacy", [3], now - 100)
    (legacy / "samples.jsonl").write_text(json.dumps({"stage": "before", "step": 0}) + "\n")
    assert not is_finished(legacy)
    with (legacy / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "after", "step": 3}) + "\n")
    assert is_finished(legacy)
    # ... and final/ is written after the last checkpoint
    legacy2, _ = _fake_run(tmp_path, "legacy2", [3], now - 100)
    (legacy2 / "final").mkdir()
    (legacy2 / "final" / "config.json").write_text("{}")
    assert is_finished(legacy2)
    _ckpt(legacy2, 6, now)
    os.utime(legacy2 / "final" / "config.json", (now - 50, now - 50))
    assert not is_finished(legacy2)


def test_a_run_folder_is_not_a_model(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(
        RunError, match=rf"{run} is a run folder, not a model: did you mean {run / 'final'}\?"
    ):
        runs.check_not_run_folder(run)
    runs.check_not_run_folder(run / "final")  # the model itself: fine
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunError, match="is a run folder with no final/ model"):
        runs.check_not_run_folder(bare)
    runs.check_not_run_folder(tmp_path / "missing")  # not a run folder: the model loader says what it is


# ----------------------------------------------------------------------------- the trainer's wiring

TINY = [
    "--model=tiny-llama", "--data=bundled", "--limit=12", "--max_len=256", "--overlong=drop", "--eval_size=2",
    "--micro_batch=1", "--grad_accum=2", "--lr=1e-3", "--num_samples=0", "--no-save_final", "--no-progress",
    "--device=cpu", "--precision=fp32",
]  # fmt: skip


def _main(capsys, *argv):
    """The recipes' entry point; returns (exit status, stderr)."""
    capsys.readouterr()
    rc = trainer.main(TrainConfig(), [*TINY, *argv])
    return rc, capsys.readouterr().err


def _steps(run):
    return [r["step"] for r in runs.read_metrics(run) if "loss" in r]


def test_a_run_holds_its_folder_for_its_whole_life(tmp_path, monkeypatch, capsys):
    seen = []
    real_train_line = runs.MetricsWriter.train

    def train_line(self, row):  # mid-run: the folder is locked by this process
        lock = self.path.parent / ".lock"
        seen.append(lock.read_text().split())
        with pytest.raises(RunError, match=rf"is in use by PID {os.getpid()}"):
            with hold_run_lock(self.path.parent):
                pass
        real_train_line(self, row)

    monkeypatch.setattr(runs.MetricsWriter, "train", train_line)
    rc, _ = _main(capsys, f"--out_dir={tmp_path}", "--run_name=r", "--max_steps=2", "--save_every=1")
    assert rc == 0 and seen == [[str(os.getpid())]] * 2
    assert not (tmp_path / "r" / ".lock").exists()  # released at the end
    assert json.loads((tmp_path / "r" / "finished.json").read_text())["step"] == 2
    # resumed: locked too
    seen.clear()
    rc, _ = _main(capsys, f"--out_dir={tmp_path}", "--resume=r", "--max_steps=3")
    assert rc == 0 and seen == [[str(os.getpid())]]


def test_a_second_process_on_a_run_in_use_gets_one_line_and_exit_2(tmp_path, capsys):
    rc, _ = _main(capsys, f"--out_dir={tmp_path}", "--run_name=r", "--max_steps=2", "--save_every=1")
    assert rc == 0
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    other = _hold(tmp_path / "r", 60)  # another process holds the run (as a resume running there would)
    try:
        assert other.stdout.readline().strip() == "held"
        rc, err = _main(capsys, f"--out_dir={tmp_path}", "--resume=r", "--max_steps=4")
    finally:
        other.kill()
        other.communicate()
    assert rc == 2
    assert err.endswith(f"error: run folder {tmp_path / 'r'} is in use by PID {other.pid}; "
                        "wait for it to end (or stop it) before running in this folder\n")  # fmt: skip
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before  # untouched


def test_generated_names_of_the_entry_point_never_collide(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "run_name", lambda model, data: "20250101-000000_tiny-llama_bundled")
    for _ in range(2):  # two runs started "in the same second"
        assert _main(capsys, f"--out_dir={tmp_path}", "--max_steps=1")[0] == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["20250101-000000_tiny-llama_bundled", "20250101-000000_tiny-llama_bundled-2"]
    assert all(_steps(tmp_path / n) == [1] for n in names)
    # a chosen name is never changed: the second run with it is refused
    assert _main(capsys, f"--out_dir={tmp_path}", "--run_name=x", "--max_steps=1")[0] == 0
    rc, err = _main(capsys, f"--out_dir={tmp_path}", "--run_name=x", "--max_steps=1")
    assert rc == 2 and "already exists; pick another --run_name" in err


def test_resume_takes_the_flags_that_may_change_and_refuses_the_rest(tmp_path, capsys):
    rc, _ = _main(capsys, f"--out_dir={tmp_path}", "--run_name=r", "--max_steps=2", "--save_every=1")
    assert rc == 0 and _steps(tmp_path / "r") == [1, 2]
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    rc, err = _main(capsys, f"--out_dir={tmp_path}", "--resume=r", "--max_steps=4", "--lr=5e-2", "--seed=3")
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(
        "error: --resume continues a run with its own settings; these cannot change: "
        "--lr=0.05 (run has 0.001), --seed=3 (run has 0)"
    )
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before
    rc, err = _main(capsys, f"--out_dir={tmp_path}", "--resume=r", "--max_steps=1")
    assert rc == 2 and "error: --max_steps=1: the checkpoint is already at step 2" in err
    # the same values as the run's (TINY repeats them all) and the changeable ones: taken
    rc, _ = _main(capsys, f"--out_dir={tmp_path}", "--resume=r", "--max_steps=4", "--eval_every=1")
    assert rc == 0 and _steps(tmp_path / "r") == [1, 2, 3, 4]
    evals = [r["step"] for r in runs.read_metrics(tmp_path / "r") if "eval_loss" in r]
    assert evals == [0, 2, 3, 4]  # the first run's end at step 2, then every step (the new cadence)
    saved = json.loads((checkpoints.list_checkpoints(tmp_path / "r")[-1] / "config.json").read_text())
    assert (saved["max_steps"], saved["eval_every"], saved["lr"]) == (4, 1, 1e-3)
    assert json.loads((tmp_path / "r" / "finished.json").read_text())["step"] == 4


def test_resume_config_in_python():
    from sft.config import RESUME_CHANGEABLE, resume_config

    saved = TrainConfig(model="tiny-llama", max_steps=5, stop_after=2, lr=1e-3)
    # given=None: the fields that differ from TrainConfig()'s defaults count as given
    cfg = resume_config(saved, TrainConfig(resume="r", out_dir="o", max_steps=9), step=2)
    assert (cfg.model, cfg.max_steps, cfg.stop_after, cfg.lr, cfg.resume) == ("tiny-llama", 9, 0, 1e-3, "r")
    with pytest.raises(ConfigError, match=r"cannot change: --model=tiny-mpt \(run has tiny-llama\)"):
        resume_config(saved, TrainConfig(model="tiny-mpt"), given=["model"])
    assert "lr" not in RESUME_CHANGEABLE and "max_steps" in RESUME_CHANGEABLE


# ----------------------------------------------------------------------------- resume on changed inputs


def _recipe_module(monkeypatch):
    """sft/train_smollm2_guanaco.py imported as a module (its top level rewrites sys.path[0]: restored)."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("recipe_smollm2", REPO / "sft" / "train_smollm2_guanaco.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_rows(path, answer):
    from sft.data.sample_data import BUNDLED

    rows = [{"messages": c} for c in BUNDLED]
    rows[5] = {
        "messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": answer}]
    }
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_resume_refuses_changed_data_unless_told(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))
    recipe = _recipe_module(monkeypatch)
    data, out = tmp_path / "rows.jsonl", tmp_path / "runs"
    _write_rows(data, "Something.")
    argv = ["--smoke", f"--data={data}", f"--out_dir={out}", "--run_name=r", "--progress=false"]
    assert recipe.main(recipe.DEFAULTS, [*argv, "--stop_after=1"], smoke=recipe.SMOKE) == 0
    run = out / "r"
    inputs = json.loads((run / "config.json").read_text())["data"]["inputs"]
    assert (
        set(inputs) == {"data", "tokenizer", "template", "max_len", "settings"} and inputs["max_len"] == 256
    )
    log_before = (run / "train.log").read_text()
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    _write_rows(data, "Something else.")  # one row's text changed, same path
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "SFT_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "sft" / "train_smollm2_guanaco.py"), f"--resume={run}", "--progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == [
        f"error: cannot resume {run}: the data changed since the run started; "
        "pass --resume_changed_data=true to resume on the new inputs anyway"
    ]
    # nothing written but the attempt's lines appended to train.log (a resumed run continues that file)
    skip = (".lock", "train.log")
    after = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name not in skip} == {
        k: v for k, v in before.items() if k.name not in skip
    }
    assert (run / "train.log").read_text().startswith(log_before)

    with caplog.at_level(logging.WARNING, logger="sft.training.checkpoints"):
        rc = recipe.main(
            recipe.DEFAULTS, [f"--resume={run}", "--resume_changed_data=true", "--progress=false"]
        )
    assert rc == 0
    assert f"resuming {run} on changed inputs (--resume_changed_data): the data" in caplog.text
    steps = [r["step"] for r in runs.read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3]


def test_changed_inputs_names_each_part(tmp_path, neox_tokenizer):
    from sft.data.prepare import prepare_data
    from sft.model.models import byte_tokenizer

    def data(tok=neox_tokenizer, template="chatml", max_len=256, seed=0):
        p = prepare_data("bundled", tok, template=template, max_len=max_len, seed=seed, use_cache=False)
        return {"fingerprint": p.fingerprint, "inputs": p.inputs}

    base = data()
    assert checkpoints.changed_inputs(base, data()) == []
    assert checkpoints.changed_inputs(base, data(tok=byte_tokenizer())) == ["the tokenizer"]
    assert checkpoints.changed_inputs(base, data(template="guanaco")) == ["the chat template"]
    assert checkpoints.changed_inputs(base, data(max_len=512)) == ["max_len 256 -> 512"]
    assert checkpoints.changed_inputs(base, data(seed=1)) == ["setting seed"]
    old_run = {"fingerprint": "0123"}  # written before the parts were recorded
    assert checkpoints.changed_inputs(old_run, base) == [
        f"the data fingerprint (0123 -> {base['fingerprint']})"
    ]


def test_changed_inputs_names_the_source_of_a_mixture(tmp_path):
    from sft.data.mixture import SourceSpec, prepare_mixture
    from sft.model.models import byte_tokenizer

    def row(i, tag):
        return {
            "messages": [{"role": "user", "content": f"{tag} q {i}"}, {"role": "assistant", "content": "a"}]
        }

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(row(i, "A")) + "\n" for i in range(8)))
    b.write_text("".join(json.dumps(row(i, "B")) + "\n" for i in range(8)))

    def data(weight_b=1.0, template="chatml"):
        specs = [SourceSpec(str(a)), SourceSpec(str(b), weight_b)]
        m = prepare_mixture(specs, byte_tokenizer(), template=template, max_len=64, use_cache=False)
        return {"fingerprint": m.fingerprint, "inputs": m.inputs}

    base = data()
    assert (
        set(base["inputs"]["sources"]) == {str(a), str(b)} and checkpoints.changed_inputs(base, data()) == []
    )
    b.write_text("".join(json.dumps(row(i, "B")) + "\n" for i in range(1, 9)))
    assert checkpoints.changed_inputs(base, data()) == [f"source '{b}': the data"]
    assert checkpoints.changed_inputs(base, data(weight_b=2.0))[-1] == "the weights"
    both = [f"source '{a}': the chat template", f"source '{b}': the data", f"source '{b}': the chat template"]
    assert checkpoints.changed_inputs(base, data(template="guanaco")) == both
