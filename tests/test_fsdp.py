"""FSDP2 on CPU (gloo): 2 processes under torchrun give the losses of one process with the same global
batch, resume from a sharded (DCP) checkpoint, and export a final/ that transformers loads.

Slow-marked tests take ~55 s on 2 idle cores (two torchrun launches of 3 processes each, three in-process
runs); much longer on a loaded machine."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sft.config import TrainConfig
from sft.model.family import transformer_blocks
from sft.train_mpt_guanaco import DEFAULTS as MPT_DEFAULTS
from sft.train_mpt_guanaco import SMOKE as MPT_SMOKE
from sft.train_smollm2_guanaco import DEFAULTS as LLAMA_DEFAULTS
from sft.train_smollm2_guanaco import SMOKE as LLAMA_SMOKE
from sft.training import distributed, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the recipe's --smoke model (tiny random MPT, our FlexAttention/SDPA implementation), with activation
# checkpointing on, so that checkpointing + sharding is what is tested
COMMON = ["--smoke", "--grad_checkpointing", "--progress=false", "--num_samples=1"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir):
    """(step, loss, grad_norm) of train lines and (step, eval_loss) of eval lines."""
    rows = _metrics(run_dir)
    train = [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    return train, evals


def _close(a, b, tol=1e-5):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b, strict=True):
        assert x[0] == y[0]
        assert x[1:] == pytest.approx(y[1:], abs=tol), (x, y)


def _torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["sft/train_mpt_guanaco.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def runs_2_and_1(tmp_path_factory):
    """Two ranks x grad_accum=1, stopped after step 2 and resumed; one process x grad_accum=2."""
    out = tmp_path_factory.mktemp("fsdp")
    two = ["--grad_accum=1", f"--out_dir={out}", "--run_name=two"]
    p = _torchrun(*COMMON, *two, "--stop_after=2")
    assert p.returncode == 0, p.stderr[-3000:]
    stopped = _curve(out / "two")
    # --save_every: a finished run keeps an end checkpoint only when checkpoints are asked for
    p = _torchrun(f"--resume={out / 'two'}", "--progress=false", "--save_every=3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr
    rc = trainer.main(
        MPT_DEFAULTS, [*COMMON, "--grad_accum=2", f"--out_dir={out}", "--run_name=one"], smoke=MPT_SMOKE
    )
    assert rc == 0
    return out / "two", out / "one", stopped


@pytest.mark.slow
def test_two_ranks_match_one_process_and_resume(runs_2_and_1):
    two, one, stopped = runs_2_and_1
    train2, evals2 = _curve(two)
    train1, evals1 = _curve(one)
    assert [s for s, *_ in train1] == [1, 2, 3]
    _close(train2, train1)  # loss and grad norm of every step: the stopped + resumed run == one process
    _close(evals2, evals1)
    _close(stopped[0], train1[:2])  # what the first launch wrote before stopping
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["device"] == "cpu x 2 (FSDP2)" and cfg["config"]["grad_accum"] == 1
    # tokens: the 2 ranks' micro-batches together are the one process's 2 micro-batches
    rows2 = [r for r in _metrics(two) if "loss" in r]
    rows1 = [r for r in _metrics(one) if "loss" in r]
    for k in ("step_tokens_processed", "step_tokens_nonpad", "step_tokens_supervised", "tokens_supervised"):
        assert [r[k] for r in rows2] == [r[k] for r in rows1], k


KAHAN = ["--optimizer=adamw_kahan", "--precision=bf16"]  # the recipes' default optimizer, on bf16 weights


@pytest.fixture(scope="module")
def kahan_runs(tmp_path_factory):
    """As runs_2_and_1, with the recipes' default optimizer (adamw_kahan) on bf16 weights."""
    out = tmp_path_factory.mktemp("fsdp_kahan")
    p = _torchrun(*COMMON, *KAHAN, "--grad_accum=1", f"--out_dir={out}", "--run_name=two", "--stop_after=2")
    assert p.returncode == 0, p.stderr[-3000:]
    stopped = _curve(out / "two")
    # the checkpoint the resumed launch loads, read now: the safety checkpoint written while final/ is made
    # (issue 26) rotates it away (--keep_last=1) and is removed after (--save_every=0)
    from torch.distributed.checkpoint import FileSystemReader

    ck = out / "two" / "checkpoints" / "step_0000002" / "dcp"
    keys = sorted(FileSystemReader(str(ck)).read_metadata().state_dict_metadata)
    p = _torchrun(f"--resume={out / 'two'}", "--progress=false")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr
    args = [*COMMON, *KAHAN, "--grad_accum=2", f"--out_dir={out}"]
    assert trainer.main(MPT_DEFAULTS, [*args, "--run_name=one"], smoke=MPT_SMOKE) == 0
    return out / "two", out / "one", (stopped, keys)


@pytest.mark.slow
def test_two_ranks_match_one_process_with_adamw_kahan_in_bf16(kahan_runs):
    """Tolerances for bf16 weights. Step 1 starts from the same weights on the same rows, so its loss is the
    same fp32 sum (1e-6). Its gradients are bf16: 2 ranks sum two bf16 micro-batch gradients in the reduce,
    one process accumulates them into a bf16 .grad, so they may differ by rounding, one bf16 ulp (2^-8 of
    the value); the grad norm, read from them, to 2 ulps (rel 2^-7; seen: 2.3125 vs 2.296875, one ulp).
    Adam's update is (almost) invariant to the gradient's scale, so a relative gradient difference of 2^-8
    moves each update by at most ~2^-8 of itself; the loss falls by ~0.35 over these 3 steps, so the later
    losses may differ by ~0.35 * 2^-8 = 1.4e-3: tolerance 2e-3 (seen: 9e-5 at step 3, 3e-5 held out)."""
    two, one, (stopped, keys) = kahan_runs
    train2, evals2 = _curve(two)
    train1, evals1 = _curve(one)
    assert [s for s, *_ in train1] == [s for s, *_ in train2] == [1, 2, 3]
    assert train2[0][1] == pytest.approx(train1[0][1], abs=1e-6)
    for (_, loss2, norm2), (_, loss1, norm1) in zip(train2, train1, strict=True):
        assert loss2 == pytest.approx(loss1, abs=2e-3)
        assert norm2 == pytest.approx(norm1, rel=2**-7)
    _close(evals2, evals1, tol=2e-3)
    assert stopped == (train2[:2], evals2[:1])  # the resumed launch rewrote none of the first launch's lines
    # the checkpoint the resumed launch loaded holds the Kahan compensation buffers
    assert any("compensation" in k for k in keys), keys[:20]
    cfg = json.loads((two / "config.json").read_text())["config"]
    assert cfg["optimizer"] == "adamw_kahan" and cfg["precision"] == "bf16"


@pytest.mark.slow
def test_sharded_checkpoint_layout_and_rank0_files(runs_2_and_1):
    two, _, _ = runs_2_and_1
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["step_0000003"]  # keep_last=1 in the MPT recipe
    ck = two / "checkpoints" / "step_0000003"
    assert (ck / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (ck / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file()
    state = json.loads((ck / "state.json").read_text())
    assert state["world_size"] == 2 and state["format"] == "dcp" and state["step"] == 3
    assert distributed.dcp_checkpoint_problem(ck) is None
    # rank 0 alone wrote: one line per step, one before/after sample pair, no leftover temporary folder
    assert [r["step"] for r in _metrics(two) if "loss" in r] == [1, 2, 3]
    samples = [json.loads(s) for s in (two / "samples.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in samples] == ["before", "after"]
    assert not [p for p in (two / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_final_is_consolidated_and_loads_with_transformers(runs_2_and_1):
    from transformers import AutoModelForCausalLM, MptForCausalLM

    two, one, _ = runs_2_and_1
    m2 = AutoModelForCausalLM.from_pretrained(str(two / "final"))
    m1 = AutoModelForCausalLM.from_pretrained(str(one / "final"))
    assert isinstance(m2, MptForCausalLM)
    x = torch.tensor([[257, 84, 82, 68, 81, 198, 71, 72, 258]])
    with torch.no_grad():
        torch.testing.assert_close(m2(x).logits, m1(x).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sharded_checkpoint_needs_the_same_world_size(runs_2_and_1, capsys):
    two, _, _ = runs_2_and_1
    # --max_steps=4 lengthens the finished run, so the resume is refused for its world size alone
    rc = trainer.main(TrainConfig(), [f"--resume={two}", "--progress=false", "--max_steps=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == (
        f"error: {two}/checkpoints/step_0000003 was written by 2 process(es) and this run has 1: "
        "resume it with torchrun --nproc_per_node 2"
    )


@pytest.mark.slow
def test_group_of_one_equals_the_plain_path(tmp_path, monkeypatch):
    """--distributed in one process (gloo group of one): Llama (tied head, rotary buffers) through
    LossModule + fully_shard + DCP + consolidated export gives the plain path's numbers."""
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(k, "")  # init() sets its own; monkeypatch restores the originals after
    args = ["--smoke", "--progress=false", "--num_samples=0", f"--out_dir={tmp_path}"]
    assert trainer.main(LLAMA_DEFAULTS, [*args, "--run_name=plain"], smoke=LLAMA_SMOKE) == 0
    fsdp = [*args, "--run_name=fsdp", "--distributed", "--save_every=3"]  # an end checkpoint to look at
    assert trainer.main(LLAMA_DEFAULTS, fsdp, smoke=LLAMA_SMOKE) == 0
    assert not torch.distributed.is_initialized()  # the group is destroyed at the end of train()
    t1, e1 = _curve(tmp_path / "plain")
    t2, e2 = _curve(tmp_path / "fsdp")
    _close(t2, t1, tol=1e-6)
    _close(e2, e1, tol=1e-6)
    assert (tmp_path / "fsdp" / "checkpoints" / "step_0000003" / "dcp" / ".metadata").is_file()
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain" / "final"))
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "final"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=0, msg=k)


def test_transformer_blocks_of_each_architecture():
    from sft.model.models import tiny_model

    llama = tiny_model("tiny-llama", 300, seed=0)
    mpt_hf = tiny_model("tiny-mpt", 300, seed=0)
    assert transformer_blocks(llama) == list(llama.model.layers)
    assert transformer_blocks(mpt_hf) == list(mpt_hf.transformer.blocks)
    assert transformer_blocks(distributed.LossModule(llama)) == list(llama.model.layers)
    from sft.model import mpt

    ours = mpt.from_hf_model(mpt_hf)
    assert len(transformer_blocks(ours)) == 2
    with pytest.raises(ValueError, match="Linear: no transformer blocks at any of model.layers"):
        transformer_blocks(nn.Linear(2, 2))


def test_mixed_precision_policy():
    gpu = distributed.mixed_precision(torch.device("cuda"), "auto")
    assert gpu.param_dtype == torch.bfloat16 and gpu.reduce_dtype == torch.float32
    assert gpu.cast_forward_inputs is False
    for dev, prec in ((torch.device("cpu"), "auto"), (torch.device("cuda"), "fp32")):
        p = distributed.mixed_precision(dev, prec)
        assert p.param_dtype is None and p.reduce_dtype is None


def test_not_distributed_by_default(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.wanted(TrainConfig())
    assert distributed.wanted(TrainConfig(distributed=True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.wanted(TrainConfig())
    info = distributed.DistInfo()
    assert distributed.all_reduce_sum(3, info) == 3 and distributed.all_reduce_sum([1, 2.5], info) == [1, 2.5]
