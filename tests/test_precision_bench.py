"""benchmarks/precision.py: each optimizer mode's held-out loss against fp32 AdamW, run through the
recipe (``--quick``: tiny model on the CPU), and the GGUF's trip to the GPU machine (split, join,
SFT_SMOLLM2_GGUF)."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "precision.py"


def _bench():
    spec = importlib.util.spec_from_file_location("precision_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_quick_run_reports_each_mode_against_the_fp32_reference(tmp_path):
    out_dir = tmp_path / "out"
    env = {**os.environ, "SFT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", f"--out-dir={out_dir}"],
        capture_output=True, text=True, timeout=170, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out_dir / "precision.json").read_text())
    assert res["reference"] == "adamw" and res["ok"] and res["failures"] == []
    assert res["model"] == "tiny-llama"
    assert res["command"].startswith("python benchmarks/precision.py --quick")
    assert res["device"] and res["date"] and res["git"]["commit"]
    rows = {r["mode"]: r for r in res["modes"]}
    assert list(rows) == ["adamw", "adamw_kahan"]
    ref = rows["adamw"]
    assert ref["reference"] is True and ref["rel_diff"] == 0.0
    assert (ref["precision"], ref["weights_dtype"]) == ("fp32", "torch.float32")
    assert (rows["adamw_kahan"]["precision"], rows["adamw_kahan"]["weights_dtype"]) == (
        "bf16",
        "torch.bfloat16",
    )
    # recomputed from the run folders: the last held-out loss, the mean of the last `last` training losses
    ref_metrics = _metrics(out_dir / "runs" / "adamw")
    ref_held_out = [r["eval_loss"] for r in ref_metrics if "eval_loss" in r][-1]
    for mode, r in rows.items():
        metrics = _metrics(out_dir / "runs" / mode)
        evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
        train = [m["loss"] for m in metrics if "loss" in m]
        assert len(evals) >= 3 and evals[0][0] == 0 and evals[-1][0] == r["steps"] == len(train)
        assert all(math.isfinite(v) for _, v in evals) and all(math.isfinite(v) for v in train)
        assert r["held_out_loss"] == evals[-1][1] and r["held_out_start"] == evals[0][1]
        assert r["final_train_loss"] == pytest.approx(statistics.fmean(train[-res["last"] :]))
        assert r["rel_diff"] == pytest.approx((evals[-1][1] - ref_held_out) / ref_held_out)
        assert r["within"] and r["same_data"] and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        cfg = json.loads((out_dir / "runs" / mode / "config.json").read_text())["config"]
        assert (cfg["precision"], cfg["optimizer"], cfg["seed"]) == (r["precision"], r["optimizer"], 0)
        assert cfg["epochs"] == 1 and cfg["eval_every"] == res["eval_every"] and not cfg["save_final"]
    assert (out_dir / "precision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = proc.stdout.split("mode ", 1)[1]
    assert "adamw_kahan" in table and "ref" in table and "%" in table


def test_the_model_named_is_the_one_trained():
    bench = _bench()
    assert bench.model_label([], quick=False) == "SmolLM2-135M-Instruct"
    assert bench.model_label(["--lr=1e-4"], quick=True) == "tiny-llama"
    extra = ["--model=random:tiny-llama", "--max_steps=300", "--model=random:llama-400m"]
    assert bench.model_label(extra, quick=True) == "random:llama-400m"


def test_compare_fails_a_mode_outside_the_tolerance():
    bench = _bench()

    def row(mode, held_out):
        return {"mode": mode, "held_out_loss": held_out, "held_out_start": 2.0, "steps": 4,
                "evals": [(0, 2.0), (4, held_out)], "data_fingerprint": "f"}  # fmt: skip

    rows = [row("adamw", 1.5), row("adamw_kahan", 1.509), row("adamw_bf16", 1.53)]
    fails = bench.compare(rows, "adamw", 0.01)
    assert [r["within"] for r in rows] == [True, True, False]
    assert rows[2]["rel_diff"] == pytest.approx(0.02) and rows[2]["rel_diff_evals"][-1][1] == pytest.approx(
        0.02
    )
    assert (
        len(fails) == 1 and fails[0].startswith("adamw_bf16: held-out loss 1.5300") and "+2.000%" in fails[0]
    )
    assert bench.compare([{"mode": "adamw", "error": "exit 1: boom"}], "adamw", 0.01) == [
        "adamw: run failed (exit 1: boom)",
        "adamw: no reference held-out loss",
    ]


def test_sft_smollm2_gguf_points_the_loader_at_a_file(tmp_path, monkeypatch):
    from sft.model.models import ModelError, smollm2_gguf

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("SFT_SMOLLM2_GGUF", str(gguf))
    assert smollm2_gguf() == gguf
    monkeypatch.setenv("SFT_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match=r"^SFT_SMOLLM2_GGUF=.*missing.gguf: no such file"):
        smollm2_gguf()


def test_split_and_join_the_gguf_round_trip_and_check_the_sha256(tmp_path, monkeypatch, capsys):
    bench = _bench()
    src = tmp_path / "model.gguf"
    payload = os.urandom(100_001)
    src.write_bytes(payload)
    monkeypatch.setenv("SFT_SMOLLM2_GGUF", str(src))  # split reads what smollm2_gguf() finds
    parts = bench.split_gguf(tmp_path / "parts")
    assert [p.name for p in parts] == ["part0", "part1"] and [p.stat().st_size for p in parts] == [
        50_001,
        50_000,
    ]
    joined = bench.join_gguf(tmp_path / "parts")
    assert joined.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and joined.read_bytes() == payload
    assert bench.join_gguf(tmp_path / "parts") == joined and "already joined" in capsys.readouterr().out
    joined.unlink()
    damaged = bytearray(parts[1].read_bytes())
    damaged[7] ^= 1
    parts[1].write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="sha256"):
        bench.join_gguf(tmp_path / "parts")
    assert not joined.exists() and not (tmp_path / "parts" / (joined.name + ".tmp")).exists()
    parts[1].unlink()
    with pytest.raises(SystemExit, match=r"part0..part0 \(50001 bytes\) have sha256"):
        bench.join_gguf(tmp_path / "parts")


def test_the_package_gguf_splits_into_halves_under_60_mb():
    """The real file: two halves small enough for one device call each (sizes only, nothing written)."""
    from sft.model.models import smollm2_gguf

    size = smollm2_gguf().stat().st_size
    assert -(-size // 2) < _bench().PART_LIMIT <= 60_000_000
