"""Model loading (presets, local folders, offline hub ids, the SmolLM2 GGUF location) and the
document-masked forward on every attention path."""

import time
from types import SimpleNamespace

import pytest
import torch

from sft.model.models import (
    ModelError,
    byte_tokenizer,
    forward_hidden,
    load_model_and_tokenizer,
    smollm2_gguf,
    tiny_model,
)


def _cfg(**kw):
    base = dict(model="tiny-llama", tokenizer=None, seed=0, max_len=256, precision="auto", allow_pickle=False,
                mpt_impl="hf")  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def test_byte_tokenizer_ids_and_template():
    tok = byte_tokenizer()
    assert len(tok) == 260
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (
        "<|im_end|>",
        258,
        259,
        None,
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hé"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhé<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [257, 84] and ids.count(258) == 1
    assert tok.decode(ids) == text


def test_tiny_presets_tokenizer_is_a_real_bpe():
    """The tiny presets' tokenizer (issue 26 item 6): the committed byte-level BPE, what
    ``build_tiny_tokenizer`` trains (deterministic), with merges a GGUF runtime needs; every text round-trips."""
    from sft.model.models import TINY_TOKENIZER, build_tiny_tokenizer, tiny_tokenizer

    assert TINY_TOKENIZER.read_text(encoding="utf-8") == build_tiny_tokenizer()
    tok = tiny_tokenizer()
    assert len(tok) == 1024 and (tok.eos_token, tok.pad_token, tok.bos_token) == (
        "<|im_end|>",
        "<|pad|>",
        None,
    )
    assert tok.eos_token_id != tok.pad_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hé, 2024 ✓"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids.count(tok.eos_token_id) == 1
    assert len(ids) < len(text.encode()) - 10  # merges at work, not one id per byte


def test_tiny_presets_are_seeded():
    a, b, c = (tiny_model("tiny-llama", 260, seed=s) for s in (0, 0, 1))
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def _doc_batch(parts):
    ids = torch.cat(parts, 1)
    docs = torch.cat([torch.full_like(p, i, dtype=torch.int32) for i, p in enumerate(parts)], 1)
    pos = torch.cat([torch.arange(p.size(1))[None] for p in parts], 1)
    return {"input_ids": ids, "document_ids": docs, "position_ids": pos}


@pytest.mark.parametrize("name, impl", [("tiny-llama", "sdpa"), ("tiny-llama", "eager"), ("tiny-mpt", "hf"),
                                        ("tiny-mpt", "fast")])  # fmt: skip
def test_packed_documents_do_not_see_each_other(name, impl):
    model = tiny_model(name, 260, seed=0).eval()
    if impl == "eager":
        model.config._attn_implementation = "eager"
    if impl == "fast":
        from sft.model.mpt import from_hf_model

        model = from_hf_model(model).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (1, 5), generator=g), torch.randint(0, 256, (1, 7), generator=g)
    with torch.no_grad():
        h, w = forward_hidden(model, _doc_batch([a, b]))
        ha, _ = forward_hidden(model, _doc_batch([a]))
        hb, _ = forward_hidden(model, _doc_batch([b]))
    torch.testing.assert_close(h[:, :5], ha, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[:, 5:], hb, atol=1e-5, rtol=1e-5)
    assert w.weight.shape == (260, 64) and w.bias is None and w.scale is None and w.softcap is None


def test_hidden_times_head_is_the_models_logits():
    model = tiny_model("tiny-llama", 260, seed=0).eval()
    x = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        h, w = forward_hidden(model, {"input_ids": x, "document_ids": torch.zeros_like(x, dtype=torch.int32),
                                      "position_ids": torch.arange(6).repeat(2, 1)})  # fmt: skip
        torch.testing.assert_close(w.logits(h), model(x).logits)


def test_missing_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE=1"):
        load_model_and_tokenizer(_cfg(model="mosaicml/no-such-mpt"))
    assert time.perf_counter() - t0 < 2.0


def test_local_folder_round_trip_and_pickle_refused(tmp_path):
    model, tok = load_model_and_tokenizer(_cfg(model="tiny-mpt"))
    model.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    loaded, tok2 = load_model_and_tokenizer(_cfg(model=str(tmp_path / "m")))
    assert type(loaded).__name__ == "MptForCausalLM" and len(tok2) == len(tok) == 1024
    for (k, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickle weights"):
        load_model_and_tokenizer(_cfg(model=str(pickled)))


def test_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model_and_tokenizer(_cfg(model=str(tmp_path / "x.gguf")))
    with pytest.raises(ModelError, match="no config.json"):
        load_model_and_tokenizer(_cfg(model=str(tmp_path)))


def test_smollm2_gguf_is_found_in_the_package():
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_tokenizer_override_from_a_bare_tokenizer_json(shared_data):
    """`--tokenizer=<tokenizer.json>` gives the trainer the roles preview gives (the guanaco template's
    `eos_token` is defined): found when the MPT-7B recipe first ran on a GPU with MPT's bare tokenizer file."""
    from sft.data.render import render

    _, tok = load_model_and_tokenizer(
        _cfg(model="tiny-mpt", tokenizer=str(shared_data / "gpt-neox-20b-tokenizer.json"))
    )
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        "<|endoftext|>", 0, "<|padding|>", 1,
    )  # fmt: skip
    sample = render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tok, "guanaco"
    )
    assert sample.input_ids[-1] == 0 and sample.labels[-1] == 0  # the reply ends with EOS, supervised


def test_tokenizer_override_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"cannot load tokenizer '.*missing\.json'"):
        load_model_and_tokenizer(_cfg(model="tiny-llama", tokenizer=str(tmp_path / "missing.json")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE=1"):
        load_model_and_tokenizer(_cfg(model="tiny-llama", tokenizer="nobody/no-such-tokenizer"))


def test_cpu_fwd_bwd_benchmark_row_and_run(capsys):
    """benchmarks/cpu_fwd_bwd.py (RESULTS.md §6): its packed row restarts positions per document, and it runs."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_fwd_bwd.py"), run_name="b"
    )
    r = bench["row"](10, 3, 50)
    assert r["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2]]
    assert r["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    assert bench["main"](["--model=tiny-llama", "--seq_len=64", "--docs=2", "--iters=1"]) == 0
    assert "tiny-llama: 64 tokens in 2 documents" in capsys.readouterr().out


def test_family_answers_from_the_model_or_its_config_alone():
    """sft.model.family: one place says which family a model is, from the model or, at load time, its config."""
    from transformers import LlamaConfig, MptConfig

    from sft.model.family import family, family_of_config

    hf_mpt = tiny_model("tiny-mpt", 300, seed=0)
    llama = tiny_model("tiny-llama", 300, seed=0)
    ours, _ = load_model_and_tokenizer(_cfg(model="tiny-mpt", mpt_impl="fast"))
    assert [family(m).hf_mpt for m in (hf_mpt, llama, ours)] == [True, False, False]
    assert [family(m).model_type for m in (hf_mpt, llama, ours)] == ["mpt", "llama", "mpt"]
    assert [family(m).llama_like for m in (hf_mpt, llama, ours)] == [False, True, False]
    assert family_of_config(MptConfig()) == family(hf_mpt)
    by_config = family_of_config(LlamaConfig())
    assert by_config.llama_like and by_config.compiles and by_config.backends == ("sdpa", "eager")
    assert family_of_config(object()).model_type == "" and not family_of_config(object()).hf_mpt
