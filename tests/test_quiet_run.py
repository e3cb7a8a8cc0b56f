"""Disk and noise (issue 20 item 7): a finished run keeps only what its settings ask for, says how big its
folder is, prints its own lines on one stream, and keeps other packages' warnings in its train.log."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the recipe's own __main__, plus a third-party-style warning raised mid-run (as a deprecation of a
# dependency would be), in a fresh interpreter: what a user's console shows
DRIVER = textwrap.dedent(
    """
    import runpy, sys, warnings
    sys.argv = [sys.argv[0], *sys.argv[1:]]
    import sft.data.prepare as prepare
    real = prepare.prepare_data
    def noisy(*a, **k):
        warnings.warn("somepackage.thing is deprecated and will be removed", FutureWarning)
        return real(*a, **k)
    prepare.prepare_data = noisy
    runpy.run_path("sft/train_mpt_guanaco.py", run_name="__main__")
    """
)


def test_recipe_console_is_the_runs_own_lines_and_no_checkpoint_without_save_every(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, "--smoke", f"--out_dir={tmp_path}", "--run_name=r", "--save_every=0",
         "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # one stream: stderr
    err = proc.stderr
    for noise in ("Warning", "warning", "W1", "triton", "torchao", "Failed to load", "deprecated", "%|"):
        assert noise not in err, f"{noise!r} on the console:\n{err}"
    lines = err.splitlines()
    assert lines[-2].startswith("held-out loss ") and lines[-2].endswith(f"run folder {tmp_path / 'r'}")
    assert lines[-1].startswith("run folder size: ") and "(final/ " in lines[-1]
    run = tmp_path / "r"
    assert not (run / "checkpoints").exists()  # save_every=0 and the run finished: no optimizer state kept
    assert (run / "finished.json").is_file() and not (run / ".lock").exists()
    log = (run / "train.log").read_text()
    assert "FutureWarning: somepackage.thing is deprecated" in log  # off the console, in the run's log
    assert "held-out loss before training" in log


def test_an_early_stop_still_leaves_a_checkpoint_to_resume(tmp_path):
    from sft.config import TrainConfig
    from sft.training import checkpoints, trainer

    argv = ["--model=tiny-llama", "--limit=12", "--max_len=256", "--overlong=drop", "--eval_size=2",
            "--max_steps=3", "--stop_after=1", "--num_samples=0", "--no-save_final", "--no-progress",
            f"--out_dir={tmp_path}", "--run_name=r"]  # fmt: skip
    assert trainer.main(TrainConfig(), argv) == 0
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "r")] == ["step_0000001"]
    assert not (tmp_path / "r" / "finished.json").exists()
    assert trainer.main(TrainConfig(), [*argv[:-1], "--resume=r", "--stop_after=0"]) == 0
    # finished: the early stop's checkpoint is left as it was (no new one), and the run counts as finished
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "r")] == ["step_0000001"]
    assert checkpoints.is_finished(tmp_path / "r")


def test_step_lines_go_to_stderr_and_train_log_with_the_progress_bar(tmp_path):
    """Issue 26 item 5: with the progress bar on (the default), the step lines went to stdout (tqdm.write)
    and never reached train.log, while the README says ``2> run.log`` captures everything."""
    proc = subprocess.run(
        [sys.executable, "sft/train_llama_guanaco.py", "--smoke", f"--out_dir={tmp_path}", "--run_name=r"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    steps = [
        x for x in proc.stderr.replace("\r", "\n").splitlines() if x.startswith("step ") and "| loss " in x
    ]
    assert len(steps) == 3 and "step      3/3 | loss" in steps[-1], proc.stderr
    log = (tmp_path / "r" / "train.log").read_text()
    assert sum("step      " in x and "| loss " in x for x in log.splitlines()) == 3
