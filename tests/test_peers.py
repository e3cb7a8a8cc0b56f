"""benchmarks/peers.py, the peer comparison: TRL's ``SFTTrainer`` trains on exactly the recipe's samples (every
token, every supervised label, the recipe's rows per step), the timing counts each optimizer step's
micro-batches, ``--compare`` divides our tokens/s by the peer's, and Unsloth without its environment is one
line (exit 2). On the CPU with a tiny model; the GPU figures are in RESULTS.md."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "peers.py"
TINY = ["--model=random:tiny-llama", "--max_len=256", "--micro_batch=2", "--grad_accum=2", "--limit=120"]


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def test_trl_trains_on_the_recipes_tokens_and_is_compared(tmp_path):
    ours = {
        "configs": [{"name": "llama", "tokens_per_s": {"non_pad": 1234.0}, "mfu": {}, "peak_mem_gib": 9.5}]
    }
    (tmp_path / "tt.json").write_text(json.dumps(ours))
    proc = _run(*TINY, "--steps=4", f"--out={tmp_path / 'trl.json'}", f"--compare={tmp_path / 'tt.json'}")
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    res = json.loads((tmp_path / "trl.json").read_text())
    assert res["system"] == "trl" and res["device"] == "cpu" and res["steps"] == 4
    data = res["data"]
    # the recipe's own samples (38 of the first 120 rows, after its split and checks), every token packed
    assert data["samples"] == 38 and data["tokens"] == data["trl_packed_tokens"] == 6512
    assert data["supervised_labels"] == 4481 and data["trl_packed_rows"] == data["ours_packed_rows"] == 30
    s = res["settings"]
    assert (s["packing_strategy"], s["padding_free"], s["optim"], s["attn_implementation"]) == (
        "bfd",
        True,
        "adamw_torch",
        "sdpa",
    )
    assert (s["per_device_train_batch_size"], s["gradient_accumulation_steps"]) == (2, 2)
    assert s["packing_effective"] and s["padding_free_effective"]
    steps = res["per_step"]
    assert [r["micro"] for r in steps] == [2, 2, 2, 2]
    # padding-free rows of at most 2 x 256 tokens per micro-batch, all of them real
    assert all(0 < r["non_pad"] <= 2 * 2 * 256 for r in steps)
    assert res["steps_timed"] == 2  # after --warmup=2
    assert res["tokens_per_step_median"] == statistics.median(r["non_pad"] for r in steps[2:])
    cmp = res["compare"]
    assert cmp["speedup_non_pad"] == pytest.approx(1234.0 / res["tokens_per_s"]["non_pad"])
    assert "ours / trl (non-pad tokens/s, same device call)" in proc.stdout


def test_unsloth_without_its_environment_is_one_line():
    proc = _run(*TINY, "--system=unsloth", timeout=120)
    assert proc.returncode == 2, proc.stderr[-800:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --system=unsloth: unsloth cannot be imported")
    assert "bitsandbytes" in lines[0] and "uns1" in lines[0]
