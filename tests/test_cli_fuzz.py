"""Issue 26 item 8: the command lines fuzzed (hypothesis). Generated options and values go through the recipes'
argument parsing (``sft.training.trainer.main`` with a recipe's DEFAULTS and SMOKE, up to the config check that
``train`` runs first) and through the tools' parsers (``sft.chat``, ``sft.preview``, ``sft.export``,
``inf_tests.latency``). The only outcomes allowed: a run that starts (here: a config that passes every rule, or a
parsed namespace) or exactly one ``error: ...`` line on stderr with exit status 2. A traceback fails the test."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import runpy
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sft.config import TrainConfig, check_config  # noqa: E402
from sft.training import trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values a user types: numbers of every size and sign, non-finite ones, words, lists, paths, nothing
VALUES = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "1", "-1", "nan", "inf", "-inf", "1e30", "1e-30", "true", "false", "none", "auto",
                     "cpu", "cuda", "bf16", "fp32", "2,3", "0.9,0.95", "0.9,", ",", "a,b", "latest", "bundled",
                     "f16", "q8_0", "cut", "drop", "adamw", "sgd", "/", "..", "x y", "é", "--", "=", "0x10"]),
    st.text(max_size=12),
)  # fmt: skip


def _option(names):
    name = st.sampled_from(names)
    return st.one_of(
        st.tuples(name, VALUES).map(lambda nv: f"--{nv[0]}={nv[1]}"),
        name.map(lambda n: f"--{n}"),
        name.map(lambda n: f"--no-{n}"),
        st.text(min_size=1, max_size=10).filter(lambda s: s not in ("-h", "--help")),  # stray words, typos
    )


def _one_error_line(err: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("error: ") and err.endswith("\n"), repr(err)


class _Started(Exception):
    """Raised by the stand-in for the run: the command line was accepted and the config passed every rule."""


def _recipe(script: str):
    saved = list(sys.path)
    try:
        return runpy.run_path(str(REPO / "sft" / script), run_name="recipe")
    finally:
        sys.path[:] = saved


RECIPES = {name: _recipe(name) for name in ("train_mpt_guanaco.py", "train_smollm2_guanaco.py")}


@pytest.mark.parametrize("script", sorted(RECIPES))
@SETTINGS
@given(argv=st.lists(_option(FIELDS + ["smoke", "micro_bach", "lr_rate"]), max_size=5))
def test_recipe_command_lines(script, argv):
    recipe = RECIPES[script]
    started = []

    def fake_train(cfg, given=None):  # what train() checks before anything is loaded, then "start"
        check_config(cfg)
        started.append(cfg)
        raise _Started

    err = io.StringIO()
    real = trainer.train
    trainer.train = fake_train
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = trainer.main(recipe["DEFAULTS"], argv, smoke=recipe["SMOKE"])
            except _Started:
                rc = None
    finally:
        trainer.train = real
    if rc is None:
        assert len(started) == 1  # a run that starts
    else:
        assert rc == 2, (rc, err.getvalue())
        _one_error_line(err.getvalue())


def _parse_tool(parse, argv) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse(argv)
        except SystemExit as e:
            assert e.code == 2, (e.code, err.getvalue())
            _one_error_line(err.getvalue())
            return
    assert err.getvalue() == ""


def _chat(argv):
    from sft.chat import parse_args

    return parse_args(argv)


def _preview(argv):
    from sft.preview import _parser

    return _parser().parse_args(argv)


def _latency(argv):
    from inf_tests.latency import parse_args

    return parse_args(argv)


def _export(argv):
    from sft.export import _parser

    return _parser().parse_args(argv)


TOOLS = {
    "chat": (_chat, ["max_new_tokens", "temperature", "top_k", "top_p", "seed", "max_seq_len", "device", "dtype",
                     "template", "system", "once", "allow_pickle"], ["tiny-llama"]),
    "preview": (_preview, ["data", "tokenizer", "model", "template", "fmt", "n", "max_len", "overlong",
                           "bad_rows", "limit", "no_cache"], []),
    "latency": (_latency, ["model", "prompt_lens", "batches", "new_tokens", "decode_prompt_len", "warmup",
                           "repeats", "paths", "device", "dtype", "compile", "compile_mode", "copy_mib", "threads",
                           "time_budget_s", "out", "force"], []),
    "export": (_export, ["gguf", "out", "force"], ["runs/x"]),
}  # fmt: skip


@pytest.mark.parametrize("tool", sorted(TOOLS))
@SETTINGS
@given(data=st.data())
def test_tool_command_lines(tool, data):
    parse, names, positional = TOOLS[tool]
    argv = positional + data.draw(st.lists(_option(names), max_size=5))
    _parse_tool(parse, argv)


@pytest.mark.parametrize(
    "tool, argv",
    [
        ("chat", ["tiny-llama", "--temperature=-1"]),
        ("chat", ["tiny-llama", "--top_p=5"]),
        ("chat", ["tiny-llama", "--max_new_tokens=0"]),
        ("preview", ["--model=x", "--max_len=0"]),
        ("latency", ["--model=x", "--new_tokens=0"]),
        ("latency", ["--model=x", "--prompt_lens=0"]),
        ("latency", ["--model=x", "--batches=-1"]),
        ("latency", ["--model=x", "--threads=-1"]),
        ("export", ["runs/x"]),
    ],
)
def test_the_cases_issue_26_found_are_one_line(tool, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        TOOLS[tool][0](argv)
    assert e.value.code == 2
    _one_error_line(err.getvalue())
