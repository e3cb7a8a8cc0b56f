"""TrainConfig and --field=value parsing: types, choices, booleans, errors naming close matches."""

import dataclasses

import pytest

from sft.config import ConfigError, TrainConfig, parse_args


def test_every_field_has_a_default_and_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f.name


def test_overrides_are_converted_to_the_field_types():
    cfg = parse_args(
        [
            "--lr=3e-4",
            "--max_len=512",
            "--betas=0.8,0.99",
            "--limit=none",
            "--template=chatml",
            "--eval_size=0.1",
        ]
    )
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.max_len == 512 and isinstance(cfg.max_len, int)
    assert cfg.betas == (0.8, 0.99)
    assert cfg.limit is None and cfg.template == "chatml" and cfg.eval_size == 0.1


def test_booleans():
    assert parse_args(["--grad_checkpointing"]).grad_checkpointing is True
    assert parse_args(["--packing=false"]).packing is False
    assert parse_args(["--no-packing"]).packing is False
    assert parse_args(["--packing=1"]).packing is True


def test_recipe_defaults_are_kept_and_overridden():
    base = dataclasses.replace(TrainConfig(), model="tiny-mpt", lr=1e-3)
    cfg = parse_args(["--lr=2e-3"], base)
    assert cfg.model == "tiny-mpt" and cfg.lr == 2e-3
    assert base.lr == 1e-3  # defaults not mutated


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--micro_bach=2", "unknown config key --micro_bach; did you mean --micro_batch?"),
        ("--learning_rate=1", "unknown config key --learning_rate"),
        ("--lr=fast", "--lr=fast: expected a number"),
        ("--max_steps=1.5", "--max_steps=1.5: expected an integer"),
        ("--packing=maybe", "--packing=maybe: expected true/false"),
        ("--betas=0.9", "--betas=0.9: expected two numbers 'a,b'"),
        (
            "--optimizer=sgd",
            "--optimizer=sgd: expected one of auto, adamw, adamw_bf16, adamw_kahan, adamw_sr, adamw_8bit",
        ),
        ("--max_len=4", "--max_len=4: must be >= 8"),
        ("--lr", "--lr needs a value: --lr=..."),
        ("lr=1", "unexpected argument 'lr=1': use --field=value"),
    ],
)
def test_bad_arguments_raise_one_line(arg, message):
    with pytest.raises(ConfigError) as e:
        parse_args([arg])
    assert str(e.value) == message


def test_dict_round_trip():
    cfg = parse_args(["--betas=0.8,0.9", "--limit=7"])
    d = cfg.to_dict()
    assert d["betas"] == [0.8, 0.9]
    assert TrainConfig.from_dict(d) == cfg


def test_fields_and_bad_rows():
    from sft.config import parse_fields

    cfg = parse_args(["--fields=prompt=question,response=answer", "--bad_rows=drop"])
    assert cfg.fields == "prompt=question,response=answer" and cfg.bad_rows == "drop"
    assert parse_fields(cfg.fields) == {"prompt": "question", "response": "answer"}
    assert parse_fields(" system = sys , prompt=q ") == {"system": "sys", "prompt": "q"}
    assert parse_fields(None) is None and parse_fields("") is None
    assert TrainConfig().bad_rows == "error" and TrainConfig().fields is None


@pytest.mark.parametrize(
    "arg, message",
    [
        (
            "--fields=question",
            "--fields=question: expected 'role=column' pairs, e.g. 'prompt=question,response=answer'",
        ),
        ("--fields=query=q", "--fields=query=q: unknown role 'query' (have: prompt, response, system)"),
        ("--fields=prompt=a,prompt=b", "--fields=prompt=a,prompt=b: role 'prompt' given twice"),
        (
            "--fields=prompt=",
            "--fields=prompt=: expected 'role=column' pairs, e.g. 'prompt=question,response=answer'",
        ),
        ("--bad_rows=skip", "--bad_rows=skip: expected one of error, drop"),
    ],
)
def test_bad_fields_and_bad_rows_raise_one_line(arg, message):
    with pytest.raises(ConfigError) as e:
        parse_args([arg])
    assert str(e.value) == message


def test_guanaco_recipe_drops_bad_rows():
    from sft.train_mpt_guanaco import DEFAULTS

    assert DEFAULTS.bad_rows == "drop"


def test_lora_fields_and_cross_field_checks(monkeypatch):
    from sft.config import check_config, parse_targets

    cfg = parse_args(["--lora", "--lora_rank=8", "--lora_alpha=16", "--lora_targets=q_proj, v_proj"])
    assert (cfg.lora, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.qlora) == (
        True,
        8,
        16.0,
        0.05,
        False,
    )
    assert parse_targets(cfg.lora_targets) == ["q_proj", "v_proj"] and parse_targets(None) is None
    check_config(cfg)
    with pytest.raises(ConfigError, match=r"^--lora_targets=q_proj,: expected module names"):
        parse_args(["--lora_targets=q_proj,"])
    with pytest.raises(ConfigError, match=r"^--lora_rank=0: must be >= 1"):
        parse_args(["--lora_rank=0"])
    with pytest.raises(ConfigError, match=r"^--qlora needs --lora"):
        check_config(parse_args(["--qlora"]))
    with pytest.raises(ConfigError, match=r"^--lora_dropout=1.0: must be < 1"):
        check_config(parse_args(["--lora", "--lora_dropout=1"]))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"^--qlora needs the torchao package"):
        check_config(parse_args(["--lora", "--qlora"]))
