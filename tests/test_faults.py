"""Fault injection through the real entry points (CPU, fp32, one thread, tiny seeded Llama).

Scenarios (each a test below):
1. SIGTERM mid-run (subprocess) -> checkpoint, exit 130, clear message; resume gives bit-identical losses;
2. SIGINT (Ctrl-C) mid-run -> the same;
3. SIGKILL right after a checkpoint -> resume gives bit-identical losses;
4. SIGKILL while a checkpoint is being written (two moments) -> no half-written checkpoint is ever
   listed; resume picks the last complete one; keep_last=1 never deleted the only complete one;
5. NaN loss, on_nan=skip -> the step is skipped with a message naming it, the run goes on;
6. NaN loss, on_nan=stop -> TrainingStopped naming the step; the last good checkpoint stays;
7. NaN gradient (finite loss) -> skipped like a NaN loss;
8. truncated / corrupt newest checkpoint -> resume skips it for the newest intact one (same losses);
9. every checkpoint damaged -> RunError naming each problem;
10. full disk (ENOSPC) during a checkpoint write -> RunError naming the step, exit 2 through main(),
    the previous checkpoint intact, no temporary folder left;
11. unwritable out_dir -> one RunError line, no run folder.

The subprocess runs go through ``sft/train_smollm2_guanaco.py``'s ``main`` (the recipe's entry point) with
a driver that only wraps ``sft.training.checkpoints.save_checkpoint`` to print a line after each checkpoint and, for
scenario 4, to slow the write down (a window in which to kill it).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sft.training.engine as engine
import sft.training.trainer as trainer
from sft.config import parse_args
from sft.training import runs
from sft.training.checkpoints import checkpoint_problem, list_checkpoints
from sft.training.runs import RunError
from sft.training.trainer import TrainingStopped, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
ARGS = [
    "--model=tiny-llama", "--data=bundled", "--limit=12", "--max_len=256", "--overlong=drop", "--eval_size=2",
    f"--max_steps={STEPS}", "--micro_batch=1", "--grad_accum=2", "--lr=1e-3", "--warmup_steps=2",
    "--num_samples=0", "--no-save_final", "--no-progress", "--device=cpu", "--precision=fp32",
    "--save_every=1", "--keep_last=2", "--run_name=r",
]  # fmt: skip

DRIVER = r"""
import os, sys, time
sys.path[0] = {repo!r}
import torch
torch.set_num_threads(1)
import safetensors.torch as st
import sft.training.checkpoints as checkpoints
delay = float(os.environ.get("FAULT_SAVE_DELAY", "0"))
if delay:
    real_save_file = st.save_file
    def slow_save_file(*a, **k):
        real_save_file(*a, **k)
        print("WRITING", flush=True)
        time.sleep(delay)  # the checkpoint folder is half-written now
    st.save_file = slow_save_file
real_save = checkpoints.save_checkpoint
def save(*a, **k):
    path = real_save(*a, **k)
    print("CKPT", path.name, flush=True)
    return path
checkpoints.save_checkpoint = save
from sft.config import TrainConfig
from sft.training.trainer import main
sys.exit(main(TrainConfig(), sys.argv[1:]))
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-identical comparisons across processes need the same reduction order: one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_cache")
    old = os.environ.get("SFT_CACHE")
    os.environ["SFT_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SFT_CACHE", None)
    else:
        os.environ["SFT_CACHE"] = old


def cfg(out, *extra):
    return parse_args([*ARGS, f"--out_dir={out}", *extra])


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in runs.read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache):
    """The uninterrupted run: its per-step losses are what every resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("baseline")
    run_dir = train(cfg(out))
    got = losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    return got


def resume(out, *extra):
    return train(parse_args([f"--out_dir={out}", f"--resume={out / 'r'}", "--no-progress", *extra]))


# ----------------------------------------------------------------------------- subprocess helpers


def start(tmp_path, cache, save_delay=0.0, *extra):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    env = {
        **os.environ,
        "SFT_CACHE": str(cache),
        "FAULT_SAVE_DELAY": str(save_delay),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(driver), *ARGS, f"--out_dir={tmp_path}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def wait_for(proc, line, timeout=120):
    """Read the child's stdout until ``line``; fail (after killing it) if it ends or takes too long."""
    t0 = time.monotonic()
    for got in proc.stdout:
        if got.strip() == line:
            return
        if time.monotonic() - t0 > timeout:
            break
    proc.kill()
    raise AssertionError(f"never saw {line!r}; stderr: {proc.stderr.read()[-2000:]}")


def finish(proc, timeout=120):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


# ----------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_and_resume_is_exact(tmp_path, cache, baseline, sig):
    # a slow checkpoint write keeps the run from finishing before the signal lands
    proc = start(tmp_path, cache, 0.2)
    wait_for(proc, "CKPT step_0000002")
    proc.send_signal(sig)
    rc, err = finish(proc)
    assert rc == 130, err[-2000:]
    assert f"stopped by {sig.name}" in err and "--resume=" in err
    ckpts = list_checkpoints(tmp_path / "r")
    k = int(ckpts[-1].name[5:])
    assert 2 <= k < STEPS and checkpoint_problem(ckpts[-1]) is None
    assert not (tmp_path / "r" / "final").exists()
    resume(tmp_path)
    assert losses(tmp_path / "r") == baseline  # bit for bit, steps 1..STEPS, no duplicate lines


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path, cache, baseline):
    proc = start(tmp_path, cache, 0.2)
    wait_for(proc, "CKPT step_0000003")
    proc.kill()
    finish(proc)
    assert list_checkpoints(tmp_path / "r")[-1].name >= "step_0000003"
    resume(tmp_path)
    assert losses(tmp_path / "r") == baseline


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_sigkill_during_checkpoint_write_leaves_no_half_checkpoint(tmp_path, cache, baseline, delay):
    """Killed while step 2's checkpoint is half-written (weights on disk, optimizer not yet)."""
    proc = start(tmp_path, cache, 0.8, "--keep_last=1")
    wait_for(proc, "CKPT step_0000001")
    wait_for(proc, "WRITING")  # step 2's model.safetensors is written; optimizer.pt is not
    time.sleep(delay)
    proc.kill()
    finish(proc)
    root = tmp_path / "r" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_0000001"]
    assert checkpoint_problem(root / "step_0000001") is None
    assert any(p.name.startswith(".tmp_step_0000002") for p in root.iterdir())  # the half-written one
    resume(tmp_path)
    assert losses(tmp_path / "r") == baseline


# ----------------------------------------------------------------------------- numerical faults


def inject(monkeypatch, at_step, *, grad=False):
    """Make the training loss (or only its gradient) non-finite at optimizer step ``at_step`` (1-based)."""
    real = engine.chunked_cross_entropy_sum
    calls = {"n": 0}

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    def ce(h, w, targets, chunk):
        if not torch.is_grad_enabled():  # held-out evaluation
            return real(h, w, targets, chunk)
        calls["n"] += 1
        step = (calls["n"] - 1) // 2 + 1  # grad_accum=2 micro-batches per step
        if step == at_step:
            if grad:
                h = NanGrad.apply(h)
            else:
                return real(h, w, targets, chunk) * float("nan")
        return real(h, w, targets, chunk)

    monkeypatch.setattr(engine, "chunked_cross_entropy_sum", ce)


@pytest.mark.parametrize("grad", [False, True], ids=["nan_loss", "nan_grad"])
def test_non_finite_step_is_skipped(tmp_path, cache, baseline, monkeypatch, caplog, grad):
    inject(monkeypatch, 3, grad=grad)
    caplog.set_level("WARNING", logger="sft")
    run_dir = train(cfg(tmp_path, "--on_nan=skip"))
    got = dict(losses(run_dir))
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[1] == baseline[0][1] and got[2] == baseline[1][1]  # before the fault: unchanged
    assert (got[3] is None) != grad  # a NaN loss is written as null; a NaN gradient keeps its finite loss
    assert all(v is not None and v == v for s, v in got.items() if s != 3)  # later steps stay finite
    assert any("step 3: non-finite" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["skipped_steps"] == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache, baseline, monkeypatch):
    inject(monkeypatch, 4)
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step 4 \(--on_nan=stop\).*--resume="):
        train(cfg(tmp_path, "--on_nan=stop"))
    run_dir = tmp_path / "r"
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3]  # nothing written for the bad step
    assert losses(run_dir) == baseline[:3]
    last = list_checkpoints(run_dir)[-1]
    assert last.name == "step_0000003" and checkpoint_problem(last) is None
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())
    monkeypatch.undo()
    resume(tmp_path)  # the fault was transient: resuming reproduces the uninterrupted run
    assert losses(run_dir) == baseline


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize(
    "victim,mutate",
    [
        ("model.safetensors", lambda b: b[: len(b) // 2]),
        ("optimizer.pt", lambda b: b[: len(b) - 100]),
        ("state.json", lambda b: b[:5]),
    ],
)
def test_damaged_newest_checkpoint_is_skipped_at_resume(tmp_path, cache, baseline, caplog, victim, mutate):
    train(cfg(tmp_path, "--stop_after=3", "--keep_last=3"))
    newest = tmp_path / "r" / "checkpoints" / "step_0000003"
    (newest / victim).write_bytes(mutate((newest / victim).read_bytes()))
    assert victim in checkpoint_problem(newest)
    caplog.set_level("WARNING", logger="sft")
    resume(tmp_path)
    assert any("resuming from step_0000002 instead" in r.getMessage() for r in caplog.records)
    assert losses(tmp_path / "r") == baseline


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path, cache):
    train(cfg(tmp_path, "--stop_after=2", "--keep_last=2"))
    for ck in list_checkpoints(tmp_path / "r"):
        (ck / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        RunError, match=r"no usable checkpoint .*step_0000002: model\.safetensors is unreadable"
    ):
        resume(tmp_path)


# ----------------------------------------------------------------------------- disks


def test_full_disk_during_checkpoint_write(tmp_path, cache, monkeypatch, capsys):
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def save_file(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(st, "save_file", save_file)
    rc = trainer.main(parse_args(ARGS), [f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == (
        f"error: could not write checkpoint step_0000003 (no space left on {tmp_path / 'r'}); previous checkpoint "
        f"{tmp_path / 'r' / 'checkpoints' / 'step_0000002'} is intact"
    )
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]  # no tmp left
    assert checkpoint_problem(root / "step_0000002") is None


def test_unwritable_out_dir_leaves_nothing(tmp_path, cache):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(RunError, match=r"cannot write run folders in '.*not_a_dir/runs'"):
        train(cfg(blocker / "runs"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_out_dir(tmp_path, cache):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RunError, match="cannot write run folders"):
            train(cfg(ro))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- memory


def test_config_that_cannot_fit_is_refused_before_the_first_step(tmp_path, cache, monkeypatch):
    """Issue 8: a run that cannot fit is said before the first step, with the remedies, and no run folder."""
    from sft.config import ConfigError
    from sft.training import memory

    steps, real_count = [], engine.count_supervised
    monkeypatch.setattr(engine, "count_supervised", lambda b: steps.append(1) or 1)  # no step may start
    # CPU: the whole estimate against the available memory, as on the GPU (issue 26: the OOM killer ended
    # such runs); here less than the weights alone (tiny-llama fp32: 90,688 parameters x 4 B = 362,752 B)
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 362_751)
    with pytest.raises(ConfigError) as e:
        train(cfg(tmp_path))
    assert str(e.value).startswith("this run needs ~0.0 GiB (weights 0.0, grads 0.0, optimizer 0.0")
    # a refusal names only changes that would fit (issue 25); none of them shrinks the weights here
    assert "0.0 GiB available in this machine's memory: no single change fits" in str(e.value)
    assert steps == [] and list(tmp_path.iterdir()) == []  # no step, no run folder
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 2**30)  # enough: it runs
    monkeypatch.setattr(engine, "count_supervised", real_count)
    assert (train(cfg(tmp_path, "--max_steps=1", "--warmup_steps=1")) / "metrics.jsonl").is_file()


def test_memory_estimate_is_pinned_and_checked_against_the_gpu(monkeypatch):
    """The estimate's parts (bytes) for tiny-llama, and the CUDA rule: the total against the free memory."""
    from sft.config import ConfigError
    from sft.model.models import byte_tokenizer, tiny_model
    from sft.training import memory

    W = memory.Workload.of
    model = tiny_model("tiny-llama", len(byte_tokenizer()), 0, 256)  # 90,688 fp32 parameters, L=2, d=64
    base = ["--max_len=256", "--micro_batch=2"]
    # per un-checkpointed layer and token: 5.1 + qkv (4 + 2 x 2 heads of 16 = 128 = 2 d) + 3 x ffn (128 = 2 d)
    per_layer = 5.1 + 2 + 3 * 2
    assert memory.activation_elements_per_layer(model) == pytest.approx(per_layer)
    # full fine-tuning, adamw on fp32: 4 B weights + 4 B grad + 8 B moments per parameter; activations
    # 512 tokens x 64 x (per_layer x 2 layers) x 4 B + 2 x 512 x 260 (vocab) x 4 B of loss-chunk logits and
    # grads, + the head's gradient twice (2 x 260 x 64 x 4 B: the chunks' running sum and the current chunk's);
    # one micro-batch per step: the peak holds the larger of the activations and the gradients
    acts = int(512 * 64 * per_layer * 2 * 4) + 2 * 512 * 260 * 4 + 2 * 260 * 64 * 4
    assert memory.estimate_memory(model, W(parse_args(base)), autocast=False) == {
        "weights": 362_752, "grads": 362_752, "optimizer": 725_504, "activations": acts,
        "total": 362_752 + 725_504 + max(acts, 362_752), "host": 0,
    }  # fmt: skip
    # with accumulation the gradients of the earlier micro-batches are alive during the next forward
    accum = memory.estimate_memory(model, W(parse_args([*base, "--grad_accum=2"])), autocast=False)
    assert accum["total"] == 362_752 * 4 + acts  # weights + 2 moments + grads + activations
    # LoRA r=16 on the 7 linear layers: 32,768 fp32 adapter parameters carry grads and state;
    # checkpointing all blocks keeps 1 d-vector per layer + one block's set
    lora_ckpt = memory.estimate_memory(model, W(parse_args([*base, "--lora"])), False, checkpoint_blocks=2)
    acts_ckpt = int(512 * 64 * (2 + per_layer) * 4) + 2 * 512 * 260 * 4  # 2 inputs + one recomputed set
    # (the head is frozen under LoRA: no head gradient)
    assert lora_ckpt == {
        "weights": 362_752 + 131_072, "grads": 131_072, "optimizer": 262_144, "activations": acts_ckpt,
        "total": 362_752 + 131_072 * 3 + max(acts_ckpt, 131_072), "host": 0,
    }  # fmt: skip
    # bf16 weights with the Kahan optimizer: 2 B weights + 2 B grads + 6 B state; bf16 activations
    bf16 = memory.estimate_memory(
        model.to(torch.bfloat16), W(parse_args(["--max_len=256", "--optimizer=adamw_kahan"])), autocast=False
    )
    assert (bf16["weights"], bf16["grads"], bf16["optimizer"]) == (181_376, 181_376, 544_128)
    assert bf16["activations"] == int(256 * 64 * per_layer * 2 * 2) + 2 * 256 * 260 * 4 + 2 * 260 * 64 * 2

    cuda = torch.device("cuda")  # never touched: the free-memory query is replaced
    c = parse_args([*base, "--plan_split=off"])  # the checkpointing rule alone (test_memory_plan: the split)
    total = memory.estimate_memory(model.float(), W(c), autocast=True)["total"]
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: total)
    assert memory.plan_memory(model, c, cuda, autocast=True).checkpoint_blocks == 1  # 4% kept free
    monkeypatch.setattr(memory, "FREE_MEMORY_HEADROOM", 0.0)
    plan = memory.plan_memory(model, c, cuda, autocast=True)
    assert (plan.checkpoint_blocks, plan.estimate["total"]) == (0, total)  # fits exactly, nothing recomputed
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: total - 1)
    assert memory.plan_memory(model, c, cuda, autocast=True).checkpoint_blocks == 1  # one block recomputes
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 1)
    with pytest.raises(
        ConfigError, match=r"^this run needs ~0\.0 GiB .* 0\.0 GiB free on the device: no single change fits"
    ):
        memory.plan_memory(model, c, cuda, autocast=True)
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: None)  # unknown: no check
    assert memory.plan_memory(model, c, cuda, autocast=True).checkpoint_blocks == 0
