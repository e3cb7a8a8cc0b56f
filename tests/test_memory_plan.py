"""The memory plan's choices (sft/training/memory.py) for the recipes at the real shapes, against the memory of
an 80 GB card (76 GiB usable: the H100 / A100 80 GB profile) and of an H200 (133 GiB): ``--optimizer=auto``
picks the most precise optimizer state that recomputes no block, splitting the micro-batch (same rows per
step) where that avoids recomputation; a refusal names only single changes that would fit.

The models are built on the meta device (shapes, no memory); the plan reads parameter counts and configs only.
"""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import transformers

from sft.config import ConfigError
from sft.model.models import RANDOM_PRESETS
from sft.training.memory import plan_memory, relative_time

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # only its type is read: no GPU is needed


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "sft" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.DEFAULTS


def _model(preset: str):
    cls, fields = RANDOM_PRESETS[preset]
    config = getattr(transformers, cls)(**fields)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


@pytest.fixture(scope="module")
def llama():
    return _model("llama-3-8b")


def _plan(model, cfg, gib):
    return plan_memory(model, dataclasses.replace(cfg, memory_limit_gib=gib), CUDA, False, 1, "flex")


@pytest.mark.parametrize(
    "preset, recipe, gib, want",
    [
        # (optimizer, micro_batch, grad_accum, checkpointed blocks)
        ("llama-3-8b", "train_llama_guanaco.py", 76, ("adamw_sr", 1, 16, 0)),
        ("llama-3-8b", "train_llama_guanaco.py", 133, ("adamw_kahan", 4, 4, 0)),
        ("qwen3-8b", "train_llama_guanaco.py", 76, ("adamw_sr", 1, 16, 0)),
        ("qwen3-14b", "train_llama_guanaco.py", 133, ("adamw_sr", 1, 16, 0)),
        ("mpt-7b", "train_mpt_guanaco.py", 76, ("adamw_kahan", 1, 16, 0)),
        ("mpt-7b", "train_mpt_guanaco.py", 133, ("adamw_kahan", 4, 4, 0)),
    ],
)
def test_auto_picks_the_most_precise_state_that_recomputes_nothing(preset, recipe, gib, want):
    cfg = _recipe(recipe)
    plan = _plan(_model(preset), cfg, gib)
    assert (plan.optimizer, plan.micro_batch, plan.grad_accum, plan.checkpoint_blocks) == want
    assert plan.micro_batch * plan.grad_accum == cfg.micro_batch * cfg.grad_accum  # same rows per step
    assert plan.estimate["total"] <= gib * 2**30
    if want[0] != "adamw_kahan":
        assert "adamw_kahan does not fit" in plan.why


def test_an_explicit_optimizer_is_kept_and_the_plan_recomputes_instead(llama):
    cfg = dataclasses.replace(_recipe("train_llama_guanaco.py"), optimizer="adamw_8bit", plan_split="off")
    plan = _plan(llama, cfg, 76)
    assert (plan.optimizer, plan.micro_batch, plan.grad_accum) == ("adamw_8bit", 4, 4)
    assert 0 < plan.checkpoint_blocks < 32  # 4 rows of 2,048 do not fit whole next to 8-bit state at 76 GiB
    # with the split allowed, the same optimizer runs 2 rows x 8 with nothing recomputed
    split = _plan(llama, dataclasses.replace(cfg, plan_split="auto"), 76)
    assert (split.micro_batch, split.grad_accum, split.checkpoint_blocks) == (2, 8, 0)


def test_the_speed_model_prefers_a_smaller_micro_batch_to_recomputing_blocks():
    assert relative_time(0, 32, 2048) < relative_time(4, 32, 8192)
    assert relative_time(0, 32, 8192) == 1.0


def test_a_refusal_names_only_changes_that_fit():
    cfg = _recipe("train_llama_guanaco.py")
    model = _model("qwen3-14b")
    with pytest.raises(ConfigError) as e:
        _plan(model, cfg, 76)
    msg = str(e.value)
    assert "\n" not in msg and "--optimizer=adamw_kahan" not in msg
    fixes = re.search(r"try (.*)$", msg).group(1).split(" or ")
    assert fixes
    for fix in fixes:  # each named change, applied alone, gives a plan
        change = {}
        for flag in fix.split():
            k, _, v = flag.removeprefix("--").partition("=")
            change[k] = True if v == "" else type(getattr(cfg, k))(v)
        _plan(model, dataclasses.replace(cfg, **change), 76)
