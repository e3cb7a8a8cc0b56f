"""Several sources in one run (sft/data/mixture.py): the --data grammar, its errors, the weighted mix, --eval_data."""

import json
import random

import pytest

from sft.config import ConfigError
from sft.data.mixture import SourceSpec, mix, parse_sources, prepare_mixture
from sft.data.render import Sample
from sft.data.schema import DataError
from sft.model.models import byte_tokenizer

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)


def conversations(tag: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct conversations of varied length whose every text carries ``tag``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = f"{tag} question {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
        a = f"{tag} answer {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def two_files(tmp_path):
    return (
        write_jsonl(tmp_path / "chat.jsonl", conversations("AAA", 300, 1)),
        write_jsonl(tmp_path / "task.jsonl", conversations("BBB", 200, 2)),
    )


def prep(specs, tmp_path, **kw):
    kw = {"max_len": 512, "seed": 0, "cache_dir": tmp_path / "cache", **kw}
    return prepare_mixture(specs, byte_tokenizer(), **kw)


def texts(samples) -> list[str]:
    tok = byte_tokenizer()
    return [tok.decode(s.input_ids) for s in samples]


# ----------------------------------------------------------------------------- grammar


def test_single_source_is_read_as_before(tmp_path):
    f = write_jsonl(tmp_path / "a,b:c=d.jsonl", conversations("X", 2, 0))  # ',' ':' '=' in an existing path
    assert parse_sources(str(f)) == [SourceSpec(str(f))]
    got = parse_sources("bundled", defaults={"fmt": "messages", "limit": 5, "fields": None})
    assert got == [SourceSpec("bundled", fmt="messages", limit=5)]


def test_several_entries_with_options_and_globals(two_files):
    a, b = two_files
    specs = parse_sources(
        f"{a}:weight=1.0,{b}:weight=0.5:fmt=prompt_response:fields=prompt=q;response=r,owner/set:split=test",
        defaults={"limit": 7, "bad_rows": "drop"},
    )
    assert specs == [
        SourceSpec(str(a), 1.0, limit=7, bad_rows="drop"),
        SourceSpec(
            str(b), 0.5, "prompt_response", {"prompt": "q", "response": "r"}, limit=7, bad_rows="drop"
        ),
        SourceSpec("owner/set", 1.0, split="test", limit=7, bad_rows="drop"),
    ]
    assert specs[2].name == "owner/set:split=test" and specs[0].name == str(a)


def test_windows_style_path_keeps_its_colon(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "C:data.jsonl", conversations("X", 2, 0))
    assert parse_sources("C:data.jsonl:weight=2")[0] == SourceSpec("C:data.jsonl", 2.0)


def test_spec_files_json_and_yaml(two_files, tmp_path):
    a, b = two_files
    j = tmp_path / "mix.json"
    j.write_text(
        json.dumps({"sources": [{"source": str(a)}, {"source": str(b), "weight": 0.5, "fields": "prompt=q"}]})
    )
    y = tmp_path / "mix.yaml"
    y.write_text(f"- source: {a}\n- source: {b}\n  weight: 0.5\n  fields: {{prompt: q}}\n")
    want = [SourceSpec(str(a)), SourceSpec(str(b), 0.5, fields={"prompt": "q"})]
    assert parse_sources(f"@{j}") == want and parse_sources(f"@{y}") == want


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("missing.jsonl", DataError, "missing.jsonl: data file does not exist"),
        (
            "bundled:wieght=2",
            ConfigError,
            "source 'bundled': unknown option 'wieght'; did you mean 'weight'?",
        ),
        ("bundled:colour=red", ConfigError, "source 'bundled': unknown option 'colour' (have: weight, fmt,"),
        ("bundled:weight=0", ConfigError, "source 'bundled': option weight=0 must be > 0"),
        ("bundled:weight=-1", ConfigError, "source 'bundled': option weight=-1 must be > 0"),
        ("bundled:weight=lots", ConfigError, "source 'bundled': option weight=lots is not a number"),
        ("bundled:weight=0,o/x:weight=0", ConfigError, "source 'bundled': option weight=0 must be > 0"),
        ("bundled:limit=0", ConfigError, "source 'bundled': option limit=0 must be >= 1"),
        ("bundled:foo", ConfigError, "source 'bundled': option 'foo' is not key=value"),
        ("bundled,bundled", ConfigError, "source 'bundled' is given twice"),
        (
            "bundled:fields=question=q",
            ConfigError,
            "source 'bundled': option fields=question=q: unknown role",
        ),
        ("@nope.yaml", ConfigError, "--data=@nope.yaml: file not found"),
        ("", ConfigError, "--data: empty"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, error, message):
    with pytest.raises(error) as e:
        parse_sources(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_weight_is_refused_in_eval_data():
    with pytest.raises(ConfigError, match="--eval_data: source 'bundled': option 'weight' has no meaning"):
        parse_sources("bundled:weight=1", what="--eval_data", weighted=False)


# ----------------------------------------------------------------------------- the mix


def fake(n, length, tag):
    return [Sample([tag] * length, [tag] * length) for _ in range(n)]


def test_mix_repeats_a_small_source_and_samples_a_large_one():
    small, large = fake(10, 10, 1), fake(100, 10, 2)  # 100 and 1000 tokens; weights 1:1 -> 550 each
    out, per = mix([small, large], [1.0, 1.0], seed=0)
    assert [p["tokens"] for p in per] == [550, 550] and [p["samples"] for p in per] == [55, 55]
    assert per[0]["passes"] == 5.5 and per[1]["passes"] == 0.55
    large_ids = [id(s) for s in out if s.input_ids[0] == 2]
    assert len(set(large_ids)) == 55  # without replacement
    assert mix([small], [3.0], seed=5)[0] == small  # one source: as it is, whatever the weight


def test_two_files_weighted_one_to_half_give_two_to_one_tokens(two_files, tmp_path):
    a, b = two_files
    m = prep(parse_sources(f"{a}:weight=1.0,{b}:weight=0.5"), tmp_path)
    src = {s["source"]: s for s in m.stats["sources"]}
    tok_a = sum(len(s.input_ids) for s, t in zip(m.train, texts(m.train)) if "AAA" in t)
    tok_b = sum(len(s.input_ids) for s, t in zip(m.train, texts(m.train)) if "BBB" in t)
    assert tok_a + tok_b == m.stats["tokens"] == sum(len(s.input_ids) for s in m.train)
    assert abs(tok_a / (tok_a + tok_b) - 2 / 3) < 0.02 and abs(src[str(a)]["share"] - 2 / 3) < 0.02
    assert src[str(a)]["mixed_tokens"] == tok_a and src[str(b)]["mixed_tokens"] == tok_b
    assert src[str(a)]["target_share"] == pytest.approx(2 / 3) and src[str(b)]["weight"] == 0.5
    for s in src.values():  # config.json's per-source record
        assert (
            len(s["fingerprint"]) == 24 and s["rows"] in (300, 200) and s["drops"] == {} and s["tokens"] > 0
        )
    # the same seed: the same rows in the same order; another seed: another draw
    again = prep(parse_sources(f"{a}:weight=1.0,{b}:weight=0.5"), tmp_path, use_cache=False)
    assert [s.input_ids for s in again.train] == [s.input_ids for s in m.train]
    other = prep(parse_sources(f"{a}:weight=1.0,{b}:weight=0.5"), tmp_path, seed=1)
    assert [s.input_ids for s in other.train] != [s.input_ids for s in m.train]
    assert m.fingerprint != other.fingerprint


def test_held_out_split_per_source_without_eval_data(two_files, tmp_path):
    a, b = two_files
    m = prep(parse_sources(f"{a},{b}"), tmp_path, eval_size=4)
    assert {k: len(v) for k, v in m.eval_by_source.items()} == {str(a): 4, str(b): 4}
    assert ["AAA" in c[0]["content"] for c in m.eval_conversations[:4]] == [True, False, True, False]


def test_eval_data_never_trains_and_total_overlap_is_refused(two_files, tmp_path):
    a, _ = two_files
    rows = conversations("AAA", 300, 1)
    held = conversations("HELD", 6, 3) + rows[:3]  # three also in the training file
    ev = write_jsonl(tmp_path / "held.jsonl", held)
    m = prep(
        parse_sources(str(a)), tmp_path, eval_specs=parse_sources(str(ev), weighted=False), eval_size=0.5
    )
    train_text = "\n".join(texts(m.train))
    assert len(m.eval_by_source[str(ev)]) == 9 and len(m.eval_conversations) == 9
    for c in held:  # by content: no held-out reply is trained on
        assert c["messages"][1]["content"] not in train_text
    assert len(m.train) == 297 and m.stats["sources"][0]["drops"] == {"in_eval_data": 3}
    assert m.stats["eval_sources"][0]["samples"] == 9
    inside = write_jsonl(tmp_path / "inside.jsonl", rows[10:15])
    with pytest.raises(
        ConfigError, match=r"--eval_data: source '.*inside.jsonl': every one of its 5 samples"
    ):
        prep(parse_sources(str(a)), tmp_path, eval_specs=parse_sources(str(inside), weighted=False))


def test_one_source_is_exactly_prepare_data(tmp_path):
    from sft.data.prepare import prepare_data

    p = prepare_data("bundled", byte_tokenizer(), max_len=512, eval_size=3, cache_dir=tmp_path)
    m = prep(parse_sources("bundled"), tmp_path, eval_size=3)
    assert [s.input_ids for s in m.train] == [s.input_ids for s in p.train]
    assert m.fingerprint == p.fingerprint and m.eval_conversations == p.eval_conversations
    assert m.stats["sources"][0]["share"] == 1.0 and m.stats["train"] == p.stats["train"]


def test_preview_shows_the_mix(two_files, tmp_path, capsys, shared_data, monkeypatch):
    from sft import preview

    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))
    a, b = two_files
    tok = str(shared_data / "gpt-neox-20b-tokenizer.json")
    assert (
        preview.main(
            [f"--data={a}:weight=1.0,{b}:weight=0.5", f"--tokenizer={tok}", "--template=guanaco", "--n=0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    line_a = next(x for x in out.splitlines() if x.startswith(f"{a}: weight 1 -> target 66.7%, actual "))
    assert "format messages, rows 300, drops {}" in line_a
    assert f"{b}: weight 0.5 -> target 33.3%" in out
    assert preview.main([f"--data={a}:weight=0", f"--tokenizer={tok}"]) == 2
    assert "option weight=0 must be > 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in the trainer


def run_args(out, a, b, ev, *extra):
    return [
        "--model=tiny-llama",
        f"--data={a}:weight=1.0:limit=40,{b}:weight=0.5:limit=40",
        f"--eval_data={ev}",
        "--max_len=256",
        "--max_steps=6",
        "--micro_batch=2",
        "--lr=1e-3",
        "--eval_every=2",
        "--save_every=2",
        "--eval_prompts=2",
        "--samples_max_new_tokens=4",
        "--num_samples=0",
        "--no-progress",
        f"--out_dir={out}",
        "--run_name=r",
        *extra,
    ]


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_trainer_mix_eval_data_resume_and_keep_best(two_files, tmp_path, monkeypatch, one_thread):
    import torch
    from safetensors.torch import load_file

    from sft.config import parse_args
    from sft.training import evaluation, runs
    from sft.training.trainer import train

    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))
    a, b = two_files
    ev = write_jsonl(tmp_path / "held.jsonl", conversations("HELD", 4, 5))
    # scripted held-out losses at steps 0, 2, 4, 6 (the real ones fall every time): step 4 is the best
    scripted = iter([5.0, 3.0, 2.0, 4.0])
    real_combine = evaluation.combine
    monkeypatch.setattr(evaluation, "combine", lambda per: {**real_combine(per), "eval_loss": next(scripted)})
    full = train(parse_args(run_args(tmp_path / "full", a, b, ev, "--keep_best")))
    monkeypatch.setattr(evaluation, "combine", real_combine)
    rows = runs.read_metrics(full)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    for r in evals:
        assert tuple(r) == runs.EVAL_KEYS and list(r["eval_loss_by_source"]) == [str(ev)]
        assert 0 <= r["eval_token_accuracy"] <= 1 and r["eval_stop_rate"] in (0.0, 0.5, 1.0)
    data = json.loads((full / "config.json").read_text())["data"]["stats"]
    assert [s["weight"] for s in data["sources"]] == [1.0, 0.5] and data["eval_sources"][0]["samples"] == 4
    assert [r["eval_loss"] for r in evals] == [5.0, 3.0, 2.0, 4.0]
    assert json.loads((full / "final" / "keep_best.json").read_text()) == {
        "step": 4,
        "eval_loss": 2.0,
        "last_step": 6,
    }
    final = load_file(str(full / "final" / "model.safetensors"))
    best = load_file(str(full / "best" / "trainable.safetensors"))
    last = load_file(str(full / "checkpoints" / "step_0000006" / "model.safetensors"))
    step4 = load_file(str(full / "checkpoints" / "step_0000004" / "model.safetensors"))
    shared = [k for k in final if k in best]
    assert len(shared) >= len(final) - 1  # every weight (a tied head may be saved once)
    assert all(torch.equal(final[k], best[k]) and torch.equal(best[k], step4[k]) for k in shared)
    assert not all(torch.equal(final[k], last[k]) for k in shared)
    # interrupted after step 3, resumed: the same losses bit for bit (the mix is a function of the seed)
    out = tmp_path / "resumed"
    train(parse_args(run_args(out, a, b, ev, "--keep_best", "--stop_after=3")))
    train(parse_args([f"--out_dir={out}", f"--resume={out / 'r'}", "--no-progress"]))
    loss = [(r["step"], r["loss"]) for r in runs.read_metrics(out / "r") if "loss" in r]
    assert loss == [(r["step"], r["loss"]) for r in rows if "loss" in r]
