"""The recipes through their real entry points (`python sft/train_x.py`), as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _recipe(name, *args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "sft" / name), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("recipe, model", [("train_smollm2_guanaco.py", "tiny-llama"),
                                           ("train_mpt_guanaco.py", "tiny-mpt")])  # fmt: skip
def test_smoke_mode_trains_a_tiny_model_of_the_recipes_architecture(recipe, model, tmp_path):
    out = _recipe(recipe, "--smoke", f"--out_dir={tmp_path}", "--progress=false")
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = list(tmp_path.iterdir())
    assert run_dir.name.endswith(f"_{model}_bundled")
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert cfg["model"] == model and cfg["smoke"] is True and cfg["max_steps"] == 3
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert "held-out loss " in out.stderr and " -> " in out.stderr
    assert "step      3/3 | loss" in out.stderr
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_openorca_smoke_trains_on_openorca_rows_with_their_system_prompts(tmp_path):
    from sft.data.formats import openorca
    from sft.data.prepare import prepare_data
    from sft.data.sample_data import OPENORCA_SAMPLE
    from sft.model.models import tiny_tokenizer

    out = _recipe("train_mpt_openorca.py", "--smoke", f"--out_dir={tmp_path}", "--progress=false")
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = list(tmp_path.iterdir())
    assert run_dir.name.endswith("_tiny-mpt_openorca-sample")  # not the Guanaco smoke's bundled sample
    info = json.loads((run_dir / "config.json").read_text())
    cfg, stats = info["config"], info["data"]["stats"]
    assert (cfg["model"], cfg["data"], cfg["fmt"], cfg["template"]) == (
        "tiny-mpt", str(OPENORCA_SAMPLE), "openorca", "guanaco")  # fmt: skip
    assert stats["format"] == "openorca" and stats["conversations"] == 12 and stats["drops"] == {}
    assert "step      3/3 | loss" in out.stderr and (run_dir / "final" / "model.safetensors").is_file()
    # the sample is OpenOrca's own columns, some system prompts empty (no system turn), as in the real set
    rows = [json.loads(x) for x in OPENORCA_SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"id", "system_prompt", "question", "response"} for r in rows)
    with_system = sum(1 for r in rows[:12] if r["system_prompt"])
    assert 0 < with_system < 12 and openorca(rows[0])[0]["role"] == "system"
    # what the run trained on (same fingerprint) carries those system prompts, rendered by the recipe's template
    kw = {k: cfg[k] for k in ("template", "fmt", "max_len", "overlong", "limit", "seed", "bad_rows")}
    eval_size = int(cfg["eval_size"]) if cfg["eval_size"] >= 1 else cfg["eval_size"]  # as the trainer does
    prepared = prepare_data(cfg["data"], tiny_tokenizer(), use_cache=False, eval_size=eval_size, **kw)
    assert prepared.fingerprint == info["data"]["fingerprint"]
    texts = [tiny_tokenizer().decode(s.input_ids) for s in prepared.train + prepared.eval]
    assert sum(t.startswith("### System: ") for t in texts) == with_system


def test_mpt_recipe_offline_without_the_model_fails_at_once(tmp_path):
    out = _recipe("train_mpt_guanaco.py", f"--out_dir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: model 'mosaicml/mpt-7b' is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE=1"
    ]
    assert not any(tmp_path.iterdir())


def test_recipe_defaults():
    sys.path.insert(0, str(REPO))
    from sft.train_mpt_guanaco import DEFAULTS as G
    from sft.train_mpt_openorca import DEFAULTS as O
    from sft.train_smollm2_guanaco import DEFAULTS as S

    assert (G.model, G.data, G.fmt, G.max_len, G.precision) == (
        "mosaicml/mpt-7b", "timdettmers/openassistant-guanaco", "guanaco", 2048, "bf16")  # fmt: skip
    assert (O.data, O.fmt, O.limit) == ("Open-Orca/OpenOrca", "openorca", 20_000)
    assert (S.model, S.data) == ("smollm2-135m-instruct", "bundled")
