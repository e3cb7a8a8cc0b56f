"""Issue 26 item 1: no command loses what a run has written (CPU, tiny seeded Llama, fp32, one thread).

1. a full disk while final/ is written (the default --save_every=0): one line naming "no space left on
   <run folder>", exit 2, nothing half-written, a complete checkpoint that --resume finishes the run from
   (no duplicate metrics line); the checkpoint nobody asked for is gone once final/ is in place;
2. the same failure with a previous final/ there: the previous final/ is intact;
3. a second Ctrl-C while final/ is written: exit 130, one line, resumable;
4. a full disk during a checkpoint as torch reports it ("unexpected pos"): "no space left on <run folder>";
5. --resume of a finished run (with checkpoints): one line, exit 2, final/, metrics.jsonl and train.log
   untouched; --resume=<run>/checkpoints/<step> names the run folder to give instead.
(The export writing over the model is tests/test_export.py::test_output_inside_the_run_never_overwrites_it;
the latency results: tests/test_bad_input.py; the notebooks: tests/test_report.py.)
"""

import errno
import json

import pytest
import torch
import transformers

from sft.config import TrainConfig
from sft.training import runs, trainer

ARGS = [
    "--model=tiny-llama", "--data=bundled", "--limit=12", "--max_len=256", "--overlong=drop", "--eval_size=2",
    "--max_steps=3", "--micro_batch=1", "--grad_accum=1", "--lr=1e-3", "--warmup_steps=1", "--num_samples=0",
    "--no-progress", "--device=cpu", "--precision=fp32", "--run_name=r",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _main(tmp_path, *extra):
    return trainer.main(TrainConfig(), [*ARGS, f"--out_dir={tmp_path}", *extra])


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _failing_save(exc):
    """``save_pretrained`` that writes part of the folder, then fails with ``exc``."""
    real = transformers.PreTrainedModel.save_pretrained

    def save(self, folder, *a, **k):
        real(self, folder, *a, **k)
        raise exc

    return save


def _metric_keys(run):
    rows = runs.read_metrics(run)
    return [(r["step"], "eval" if "eval_loss" in r else "train") for r in rows]


def test_full_disk_while_final_is_written_leaves_a_resumable_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(
            transformers.PreTrainedModel,
            "save_pretrained",
            _failing_save(OSError(errno.ENOSPC, "No space left on device")),
        )
        assert _main(tmp_path) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: could not write") and f"no space left on {run}" in line
    assert f"checkpoint step_0000003 is complete: --resume={run} writes final/" in line
    assert not (run / "final").exists() and not (run / ".final.tmp").exists()
    assert not (run / "finished.json").exists()
    assert (run / "checkpoints" / "step_0000003" / "state.json").is_file()
    keys = _metric_keys(run)
    # the resume finishes the run: final/ written, no duplicate metrics line, the safety checkpoint removed
    assert trainer.main(TrainConfig(), [f"--resume={run}", "--no-progress"]) == 0
    assert (run / "final" / "model.safetensors").is_file() and (run / "finished.json").is_file()
    after = _metric_keys(run)
    assert len(after) == len(set(after)) and after == keys
    assert not (run / "checkpoints").exists()  # --save_every=0: no checkpoint kept once final/ is there


def test_failed_final_keeps_the_previous_final(tmp_path, monkeypatch):
    from sft.model.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("tiny-llama", len(tok), seed=0)
    run = tmp_path / "run"
    run.mkdir()
    runs.save_final(run, model, tok)
    before = _snapshot(run / "final")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(
        transformers.PreTrainedModel, "save_pretrained", _failing_save(OSError(errno.ENOSPC, "No space left"))
    )
    with pytest.raises(runs.RunError, match=rf"no space left on {run}\); the previous final/ is intact$"):
        runs.save_final(run, model, tok)
    assert _snapshot(run / "final") == before
    assert sorted(p.name for p in run.iterdir()) == ["final"]  # no .final.tmp / .final.old left


def test_second_ctrl_c_during_final_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "save_pretrained", _failing_save(KeyboardInterrupt()))
        assert _main(tmp_path) == 130
    line = _one_line(capsys.readouterr().err)
    assert "interrupted while writing final/" in line and f"--resume={run}" in line
    assert not (run / ".final.tmp").exists() and not (run / "final").exists()
    assert trainer.main(TrainConfig(), [f"--resume={run}", "--no-progress"]) == 0
    assert (run / "final" / "config.json").is_file()


def test_full_disk_during_a_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    """torch.save reports a short write as "unexpected pos N vs M": the line names the full disk."""
    real = torch.save

    def short_write(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 238400 vs 238292")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", short_write)
    assert _main(tmp_path, "--save_every=1", "--no-save_final") == 2
    line = _one_line(capsys.readouterr().err)
    assert f"could not write checkpoint step_0000001 (no space left on {tmp_path / 'r'})" in line
    assert "unexpected pos" not in line


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "r"
    assert _main(tmp_path, "--save_every=1", "--keep_last=2") == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert trainer.main(TrainConfig(), [f"--resume={run}", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{run} finished at step 3 (final/ written): nothing to resume" in line
    assert _snapshot(run) == before  # final/, metrics.jsonl, train.log: byte for byte
    # a checkpoint folder given for its run: named
    ckpt = run / "checkpoints" / "step_0000003"
    assert trainer.main(TrainConfig(), [f"--resume={ckpt}", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"is a checkpoint; give its run folder: --resume={run}" in line
    assert _snapshot(run) == before
    # a longer schedule does resume it
    assert trainer.main(TrainConfig(), [f"--resume={run}", "--max_steps=4", "--no-progress"]) == 0
    assert json.loads((run / "finished.json").read_text())["step"] == 4
