"""Issue 26 items 2-3: every option is checked before work starts (one ``error:`` line, exit 2, no run folder):
the trainer's ranges and combinations (sft/config.py: one rule per field, for Python and command-line configs
alike), the memory plan on the CPU, an --export_gguf that cannot work, and the tools' option ranges."""

import dataclasses

import pytest
import torch

from sft.config import ConfigError, TrainConfig, check_config, parse_args
from sft.training import trainer

TINY = ["--model=tiny-llama", "--data=bundled", "--limit=12", "--max_len=256", "--overlong=drop",
        "--eval_size=2", "--num_samples=0", "--no-progress", "--device=cpu", "--run_name=r"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr=1e30"], "--lr=1e30: must be <= 0.1 (a fine-tuning learning rate is"),
        (["--lr=0"], "--lr=0: must be > 0"),
        (["--min_lr_ratio=5"], "--min_lr_ratio=5: must be <= 1"),
        (["--eval_every=-5"], "--eval_every=-5: must be >= 0"),
        (["--betas=2,3"], "--betas=2,3: each value must be < 1 (each beta is a decay rate in [0, 1))"),
        (["--betas=0.9,-0.1"], "--betas=0.9,-0.1: each value must be >= 0"),
        (["--weight_decay=3"], "--weight_decay=3: must be <= 1"),
        (["--seed=-1"], "--seed=-1: must be >= 0"),
        (
            ["--warmup_steps=1000000", "--max_steps=3"],
            "--warmup_steps=1000000 is longer than the run (--max_steps=3)",
        ),
        (["--keep_best"], "--keep_best picks the step with the lowest held-out loss"),
        (["--keep_best", "--eval_every=2", "--eval_size=0"], "--keep_best needs a held-out set"),
    ],
)
def test_trainer_option_rules(args, message, tmp_path, capsys):
    assert trainer.main(TrainConfig(), [*TINY, f"--out_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not any(tmp_path.iterdir())


def test_python_configs_get_the_same_rules():
    for field, value in (("lr", 1e30), ("min_lr_ratio", 5.0), ("eval_every", -5), ("betas", (2.0, 3.0))):
        with pytest.raises(ConfigError, match=rf"^--{field}="):
            check_config(dataclasses.replace(TrainConfig(), **{field: value}))
    check_config(parse_args(["--lr=1e-3", "--betas=0.9,0.999", "--warmup_steps=3", "--max_steps=3"]))


def test_warmup_longer_than_an_epoch_based_run(tmp_path, capsys):
    assert trainer.main(TrainConfig(), [*TINY, f"--out_dir={tmp_path}", "--warmup_steps=1000000"]) == 2
    err = capsys.readouterr().err
    assert "--warmup_steps=1000000 is longer than the run (" in err and "--epochs=1" in err
    assert not any(tmp_path.iterdir())


def test_memory_plan_refuses_on_cpu_before_the_run_folder(tmp_path, capsys):
    """--micro_batch=100000 went on until the kernel's OOM killer (leaving a stale .lock)."""
    assert trainer.main(TrainConfig(), [*TINY, f"--out_dir={tmp_path}", "--micro_batch=100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this run needs ~" in err
    assert "available in this machine's memory" in err or "--memory_limit_gib" in err
    assert not any(tmp_path.iterdir())
    assert trainer.main(TrainConfig(), [*TINY, f"--out_dir={tmp_path}", "--max_len=100000000"]) == 2
    assert "this run needs ~" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_export_gguf_that_cannot_work_is_refused_before_training(tmp_path, capsys):
    """A tokenizer without merges (here a byte tokenizer given as --tokenizer) cannot be exported: refused
    before the run, not after it."""
    from sft.model.models import byte_tokenizer

    tok = tmp_path / "tok"
    byte_tokenizer().save_pretrained(str(tok))
    out = tmp_path / "runs"
    assert (
        trainer.main(TrainConfig(), [*TINY, f"--out_dir={out}", f"--tokenizer={tok}", "--export_gguf=f16"])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --export_gguf=f16: the tokenizer has no BPE merges") and err.count("\n") == 1
    )
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        ("chat", ["tiny-llama", "--temperature=-1"], "argument --temperature: must be >= 0, got -1"),
        ("chat", ["tiny-llama", "--top_p=5"], "argument --top_p: must be in (0, 1], got 5"),
        ("chat", ["tiny-llama", "--max_new_tokens=0"], "argument --max_new_tokens: must be >= 1, got 0"),
        ("chat", ["tiny-llama", "--max_new_tokens=-1"], "argument --max_new_tokens: must be >= 1, got -1"),
        ("chat", ["tiny-llama", "--max_seq_len=1"], "argument --max_seq_len: must be >= 2, got 1"),
        ("preview", ["--model=tiny-llama", "--max_len=0"], "argument --max_len: must be >= 8, got 0"),
        ("preview", ["--model=tiny-llama", "--n=-1"], "argument --n: must be >= 0, got -1"),
    ],
)
def test_tool_options_one_line_before_loading(tool, argv, message, capsys):
    """sft.chat / sft.preview: a value out of range is refused while parsing (the preview with --max_len=0
    looped forever; chat's were tracebacks)."""
    if tool == "chat":
        from sft.chat import cli

        rc = cli(argv)
    else:
        from sft.preview import main

        with pytest.raises(SystemExit) as e:
            main(argv)
        rc = e.value.code
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {message}\n", err


def test_preview_of_a_tiny_preset_uses_its_tokenizer(capsys):
    """``sft.preview --model=tiny-llama`` blamed a --tokenizer never given; the preset has its own."""
    from sft.preview import main

    assert main(["--model=tiny-llama", "--n=1", "--limit=4", "--no_cache"]) == 0
    assert "=== sample 0" in capsys.readouterr().out
    assert main(["--model=random:mpt-7b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model=random:mpt-7b: ") and "--tokenizer" not in err.split(":", 2)[1]


def test_an_allocation_that_fails_anyway_is_one_line_and_unlocks(tmp_path, monkeypatch, capsys):
    """The plan's estimate can be wrong: an allocation failure mid-run ends in one line, exit 2, and no
    stale .lock in the run folder."""
    from sft.training import engine

    def oom(self, *a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 171798691840 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip

    monkeypatch.setattr(engine.Engine, "step", oom)
    assert trainer.main(TrainConfig(), [*TINY, f"--out_dir={tmp_path}", "--max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and err.startswith("error: out of memory (") and "can't allocate memory" in err
    )
    assert not (tmp_path / "r" / ".lock").exists()


def test_a_recipes_warmup_on_a_short_run_is_said_not_refused(tmp_path, caplog):
    """``--max_steps=2`` to try a recipe whose default warm-up is longer: one warning line, the run goes on
    (typed on the command line, the same warm-up is refused: test_trainer_option_rules)."""
    recipe = dataclasses.replace(TrainConfig(), warmup_steps=5)
    argv = [*TINY, f"--out_dir={tmp_path}", "--max_steps=2", "--no-save_final"]
    assert trainer.main(recipe, argv) == 0
    said = "warning: the warm-up (--warmup_steps=5, the recipe's) is longer than this run (--max_steps=2)"
    assert said in caplog.text and said in (tmp_path / "r" / "train.log").read_text()
