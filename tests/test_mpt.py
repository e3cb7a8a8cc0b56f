"""sft.model.mpt against transformers' MptForCausalLM (the numerical reference), on CPU in fp32, tiny sizes."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from sft.model.mpt import (
    MPTConfig,
    MPTForCausalLM,
    alibi_slopes,
    from_hf_model,
    load_mpt,
    save_hf,
)

# The key set of mosaicml/mpt-7b's config.json (MosaicML remote-code format), at a tiny size.
MPT7B_KEYS_TINY = {
    "architectures": ["MPTForCausalLM"],
    "attn_config": {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "prefix_lm": False,
        "qk_ln": False,
        "softmax_scale": None,
    },
    "auto_map": {
        "AutoConfig": "configuration_mpt.MPTConfig",
        "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
    },
    "d_model": 64,
    "emb_pdrop": 0,
    "embedding_fraction": 1.0,
    "expansion_ratio": 4,
    "init_config": {
        "emb_init_std": None,
        "emb_init_uniform_lim": None,
        "fan_mode": "fan_in",
        "init_div_is_residual": True,
        "init_gain": 0,
        "init_nonlinearity": "relu",
        "init_std": 0.02,
        "name": "kaiming_normal_",
        "verbose": 0,
    },
    "init_device": "cpu",
    "learned_pos_emb": True,
    "logit_scale": None,
    "max_seq_len": 96,
    "model_type": "mpt",
    "n_heads": 8,
    "n_layers": 2,
    "no_bias": True,
    "norm_type": "low_precision_layernorm",
    "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.28.1",
    "use_cache": False,
    "verbose": 0,
    "vocab_size": 128,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine: two intra-op threads spin-wait on each other and make
    # every op ~20x slower (measured: 64-token generate 10 s -> 0.5 s). Restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HF_KEYS = {"init_device", "init_config", "tokenizer_name", "verbose", "auto_map", "torch_dtype"}

CONFIGS = {
    # non-power-of-two head count (6 -> slopes interleaved from the 8-head list)
    "h6": dict(d_model=48, n_heads=6, n_layers=2, max_seq_len=64, vocab_size=97),
    # transformers ignores attn_config.alibi_bias_max (always 8): only 8 can be compared with it
    "h4_eps": dict(d_model=32, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=61, layer_norm_epsilon=1e-6),
    "mpt7b_keys": {k: v for k, v in MPT7B_KEYS_TINY.items() if k not in HF_KEYS},
}


def make_hf(name: str, seed: int = 0, std: float = 0.3) -> transformers.MptForCausalLM:
    """A transformers MPT with random weights (std large enough that logits are well separated)."""
    torch.manual_seed(seed)
    hf = transformers.MptForCausalLM(transformers.MptConfig(**copy.deepcopy(CONFIGS[name]))).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return hf


def _ids(vocab, shape, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_alibi_slopes_pinned_and_match_transformers():
    assert alibi_slopes(4).tolist() == [2**-2, 2**-4, 2**-6, 2**-8]
    # 6 heads: from the 8-head list 2^-1..2^-8, odd indices then even ones, first 6
    assert alibi_slopes(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for n, bmax in [(6, 8), (12, 8), (32, 8), (5, 16), (3, 8)]:
        ref = -build_mpt_alibi_tensor(n, 2, alibi_bias_max=bmax)[:, 0, 0]  # value at distance 1
        assert torch.equal(alibi_slopes(n, bmax), ref), (n, bmax)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_grads_match_transformers(name):
    hf = make_hf(name)
    ours = from_hf_model(copy.deepcopy(hf))
    V = hf.config.vocab_size
    ids = _ids(V, (2, 37))
    hf_out = hf(ids, labels=ids)
    ours.attn_impl = "sdpa"
    logits = ours(ids)
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=0)
    if name == "h6":  # flex_eager is slow on CPU; once is enough (it is compared to sdpa elsewhere)
        with torch.no_grad():
            ours.attn_impl = "flex_eager"
            torch.testing.assert_close(ours(ids), hf_out.logits, atol=1e-5, rtol=0)
    ours.attn_impl = "sdpa"
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, hf_out.loss, atol=1e-5, rtol=0)
    hf_out.loss.backward()
    loss.backward()
    hf_grads = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(hf_grads) - {"lm_head.weight"}
    for n, p in ours_params.items():
        g_ref = hf_grads[n].grad
        if n == "transformer.wte.weight":  # tied: HF accumulates both uses into the shared tensor
            g_ref = hf.transformer.wte.weight.grad
        torch.testing.assert_close(p.grad, g_ref, atol=1e-5, rtol=1e-4, msg=n)


def test_mpt7b_key_set_parsed():
    cfg = MPTConfig.from_hf(MPT7B_KEYS_TINY)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ffn_hidden_size) == (64, 8, 2, 256)
    assert (cfg.max_seq_len, cfg.vocab_size, cfg.alibi_bias_max, cfg.logit_scale) == (96, 128, 8, None)
    full = MPTConfig.from_hf({**MPT7B_KEYS_TINY, "d_model": 4096, "n_heads": 32, "n_layers": 32})
    assert full.head_dim == 128 and full.ffn_hidden_size == 16384


@pytest.mark.parametrize("impl", ["sdpa", "flex_eager"])
def test_packed_row_equals_documents_alone(impl):
    ours = from_hf_model(make_hf("h6"))
    ours.attn_impl = impl
    lengths = [5, 17, 1, 9]  # includes a one-token document
    docs = [_ids(97, (1, n), seed=10 + i) for i, n in enumerate(lengths)]
    row = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = ours(row, document_ids)
        alone = torch.cat([ours(d) for d in docs], dim=1)
        unmasked = ours(row)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    # and the mask matters: without document ids the later documents see the earlier ones
    assert (unmasked[0, 5:] - alone[0, 5:]).abs().max() > 1e-2
    torch.testing.assert_close(unmasked[0, :5], alone[0, :5], atol=1e-5, rtol=0)


def test_flex_eager_and_sdpa_agree_on_packed_batch():
    ours = from_hf_model(make_hf("h4_eps"))
    ids = _ids(61, (2, 30))
    doc = torch.tensor([[0] * 10 + [1] * 15 + [2] * 5, [0] * 3 + [1] * 27], dtype=torch.int32)
    with torch.no_grad():
        ours.attn_impl = "sdpa"
        a = ours.forward_hidden(ids, doc)
        ours.attn_impl = "flex_eager"
        b = ours.forward_hidden(ids, doc)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gradient_checkpointing_same_grads():
    ours = from_hf_model(make_hf("h6"))
    ours.attn_impl = "sdpa"
    ids = _ids(97, (1, 20))
    grads = []
    for ckpt in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.train()
        ours.gradient_checkpointing = ckpt
        ours(ids).square().mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=0)


def test_kv_cache_matches_full_forward_in_chunks():
    ours = from_hf_model(make_hf("h4_eps"))
    ids = _ids(61, (2, 24))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(2, 40)
        pieces, start = [], 0
        for t in (7, 1, 5, 1, 10):
            pos = torch.arange(start, start + t)
            pieces.append(ours.forward_cached(ids[:, start : start + t], pos))
            start += t
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["math", "flex_eager"])
def test_prefill_with_offset_equals_full_forward(impl):
    """Multi-token cached forwards at offsets 0, 7, 8, 13 (the prefill paths: materialised bias over the
    filled keys only, and FlexAttention with the causal block mask and ALiBi offset by input_pos[0])."""
    ours = from_hf_model(make_hf("h4_eps"))
    ours.cached_prefill_impl = impl
    ids = _ids(61, (2, 24))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(2, 40)
        pieces, start = [], 0
        for t in (7, 1, 5, 11):
            pos = torch.arange(start, start + t)
            pieces.append(ours.forward_cached(ids[:, start : start + t], pos))
            start += t
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert not ours._prefill_flex_failed
    if impl == "flex_eager":  # one block mask per (t, cache length, first position), cached
        assert sorted(ours._prefill_masks) == [(5, 40, 8), (7, 40, 0), (11, 40, 13)]


def test_logits_to_keep_is_the_last_rows_of_full_logits():
    ours = from_hf_model(make_hf("h6"))
    ids = _ids(97, (2, 13))
    with torch.no_grad():
        ours.setup_cache(2, 16)
        full = ours.forward_cached(ids, torch.arange(13))
        last = ours.forward_cached(ids, torch.arange(13), logits_to_keep=1)
        last3 = ours.forward_cached(ids, torch.arange(13), logits_to_keep=3)
    assert last.shape == (2, 1, 97) and last3.shape == (2, 3, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(last3, full[:, -3:], atol=1e-5, rtol=0)


def test_flex_prefill_failure_falls_back_to_math_path(monkeypatch, caplog):
    import sft.model.mpt as mpt_mod

    def broken(*a, **k):
        raise RuntimeError("simulated kernel failure\nsecond line")

    monkeypatch.setattr(mpt_mod, "_flex", lambda compiled: broken)
    ours = from_hf_model(make_hf("h4_eps"))
    ours.cached_prefill_impl = "flex"
    ids = _ids(61, (1, 10))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(1, 12)
        with caplog.at_level("WARNING", logger="sft.model.mpt"):
            got = ours.forward_cached(ids, torch.arange(10))
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    assert ours._prefill_flex_failed
    assert "flex prefill failed (RuntimeError: simulated kernel failure)" in caplog.text


def test_flex_prefill_only_on_cuda_with_head_dim_16_and_limited_shapes():
    small = from_hf_model(make_hf("h4_eps"))  # head_dim 8
    assert small._resolve_impl(torch.device("cuda")) == "sdpa"  # inductor's flex needs head_dim >= 16
    assert small._resolve_impl(torch.device("cpu")) == "sdpa"
    assert not small._use_flex_prefill(5, torch.device("cuda"))
    m = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=8))  # head_dim 16
    assert m._resolve_impl(torch.device("cuda")) == "flex"
    m._cache_len = 64
    assert not m._use_flex_prefill(5, torch.device("cpu"))
    assert not m._use_flex_prefill(1, torch.device("cuda"))  # a decode step: materialised path
    assert all(m._use_flex_prefill(t, torch.device("cuda")) for t in range(2, 10))  # 8 shapes
    assert m._use_flex_prefill(9, torch.device("cuda"))  # seen before
    assert not m._use_flex_prefill(10, torch.device("cuda"))  # a 9th shape would be one more compile


def test_greedy_kv_cache_decoding_matches_transformers_generate():
    hf = make_hf("mpt7b_keys")
    ours = from_hf_model(hf)
    prompt = _ids(128, (1, 9), seed=3)
    n_new = 64
    with torch.no_grad():
        ref = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=0,
        )[0, prompt.shape[1] :].tolist()
        ours.setup_cache(1, prompt.shape[1] + n_new)
        logits = ours.forward_cached(prompt, torch.arange(prompt.shape[1]))
        got = []
        for i in range(n_new):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            got.append(tok.item())
            pos = torch.tensor([prompt.shape[1] + i])
            logits = ours.forward_cached(tok, pos)
    assert len(ref) == n_new
    assert got == ref
    assert len(set(got)) > 5  # a real sequence, not one token repeated


def test_save_hf_then_transformers_from_pretrained(tmp_path):
    hf = make_hf("h6")
    ours = from_hf_model(hf)
    save_hf(ours, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    back = transformers.MptForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(97, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shard", [False, True])
def test_load_mpt_on_transformers_save(tmp_path, shard):
    hf = make_hf("h4_eps")
    kw = {"max_shard_size": "20KB"} if shard else {}
    hf.save_pretrained(tmp_path / "hf", **kw)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert ("model.safetensors.index.json" in files) == shard
    ours = load_mpt(tmp_path / "hf")
    ids = _ids(61, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    half = load_mpt(tmp_path / "hf", dtype=torch.bfloat16)
    assert half.transformer.wte.weight.dtype == torch.bfloat16


def _write_mosaicml_folder(folder, hf, *, pickle=False):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MPT7B_KEYS_TINY))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    if pickle:
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        save_file(sd, folder / "model.safetensors")


def test_load_mpt_mosaicml_layout(tmp_path):
    hf = make_hf("mpt7b_keys")
    _write_mosaicml_folder(tmp_path / "mosaic", hf)
    ours = load_mpt(tmp_path / "mosaic")
    ids = _ids(128, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_pickle_refused_unless_allowed(tmp_path):
    hf = make_hf("mpt7b_keys")
    _write_mosaicml_folder(tmp_path / "pkl", hf, pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_mpt(tmp_path / "pkl")
    ours = load_mpt(tmp_path / "pkl", allow_pickle=True)
    ids = _ids(128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_learned_position_weights_refused(tmp_path):
    hf = make_hf("mpt7b_keys")
    _write_mosaicml_folder(tmp_path / "wpe", hf)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "wpe" / "model.safetensors")
    sd["transformer.wpe.weight"] = torch.zeros(96, 64)
    save_file(sd, tmp_path / "wpe" / "model.safetensors")
    with pytest.raises(ValueError, match="wpe"):
        load_mpt(tmp_path / "wpe")


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attn_config": {"clip_qkv": 6.0}}, "clip_qkv"),
        ({"attn_config": {"qk_ln": True}}, "qk_ln"),
        ({"attn_config": {"prefix_lm": True}}, "prefix_lm"),
        ({"attn_config": {"softmax_scale": 0.1}}, "softmax_scale"),
        ({"attn_config": {"attn_uses_sequence_id": True}}, "attn_uses_sequence_id"),
        ({"attn_config": {"alibi": False}}, "alibi"),
        ({"attn_config": {"attn_type": "multiquery_attention"}}, "attn_type"),
        ({"attn_config": {"rope": True}}, "rope"),
        ({"attn_config": {"some_new_flag": 1}}, "some_new_flag"),
        ({"norm_type": "rmsnorm"}, "norm_type"),
        ({"no_bias": False}, "no_bias"),
        ({"resid_pdrop": 0.1}, "resid_pdrop"),
        ({"embedding_fraction": 0.5}, "embedding_fraction"),
        ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_type"),
        ({"some_new_option": True}, "some_new_option"),
    ],
)
def test_unsupported_config_raises_naming_the_key(change, key):
    cfg = copy.deepcopy(MPT7B_KEYS_TINY)
    for k, v in change.items():
        if k == "attn_config":
            cfg["attn_config"].update(v)
        else:
            cfg[k] = v
    with pytest.raises(ValueError, match=key):
        MPTConfig.from_hf(cfg)


def test_logit_scale_applied_and_not_exported(tmp_path):
    cfg = MPTConfig.from_hf({**MPT7B_KEYS_TINY, "logit_scale": "inv_sqrt_d_model"})
    assert cfg.logit_scale == 1 / math.sqrt(64)
    torch.manual_seed(0)
    m = MPTForCausalLM(cfg, attn_impl="sdpa")
    m.init_weights()
    ids = _ids(128, (1, 6))
    with torch.no_grad():
        h = m.forward_hidden(ids)
        torch.testing.assert_close(m(ids), (h @ m.lm_head_weight.T) / 8, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logit_scale"):
        save_hf(m, tmp_path / "x")


def test_transformers_native_config_object_accepted():
    hf_cfg = transformers.MptConfig(**copy.deepcopy(CONFIGS["h4_eps"]))
    cfg = MPTConfig.from_hf(hf_cfg)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.alibi_bias_max) == (32, 4, 3, 8)
    assert cfg.layer_norm_epsilon == 1e-6


def test_alibi_bias_max_used_but_not_exported(tmp_path):
    cfg = copy.deepcopy(MPT7B_KEYS_TINY)
    cfg["attn_config"]["alibi_bias_max"] = 16
    m = MPTForCausalLM(MPTConfig.from_hf(cfg), attn_impl="sdpa")
    assert m.config.alibi_bias_max == 16
    m.init_weights()
    ids = _ids(128, (1, 8))
    with torch.no_grad():
        a = m(ids)
        m.config.alibi_bias_max = 8
        b = m(ids)
    assert (a - b).abs().max() > 1e-4  # the slopes really change
    m.config.alibi_bias_max = 16
    with pytest.raises(ValueError, match="alibi_bias_max"):
        save_hf(m, tmp_path / "x")


def test_decode_step_traces_as_one_static_graph():
    """The t=1 cached step is a single graph (fullgraph: no graph break, no host sync) with no
    recompilation across positions (what mode="reduce-overhead" needs); checked on CPU without a compiler."""
    import torch._dynamo

    ours = from_hf_model(make_hf("h4_eps"))
    ids = _ids(61, (2, 12))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # aot_eager: also functionalises the in-place cache writes, as inductor will (still no compiler).
    step = torch.compile(ours.forward_cached, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(2, 16)
        out = [ours.forward_cached(ids[:, :3], torch.arange(3))]
        out += [step(ids[:, i : i + 1], torch.tensor([i])) for i in range(3, 12)]
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_compiled_flex_matches_sdpa_forward_and_backward():
    # head_dim 16: inductor's flex kernel refuses head_dim < 16 (the "h6" config has 8, which made this
    # test fail on the H200: "NYI: embedding dimension ... must be at least 16"); 6 heads keep the
    # interleaved non-power-of-two slopes.
    CONFIGS["h6_hd16"] = dict(d_model=96, n_heads=6, n_layers=2, max_seq_len=64, vocab_size=97)
    hf = make_hf("h6_hd16", std=0.1)
    ids = _ids(97, (2, 300)).cuda()
    doc = torch.tensor([0] * 100 + [1] * 150 + [2] * 50, dtype=torch.int32).expand(2, 300).cuda()
    results = {}
    for impl in ("sdpa", "flex"):
        ours = from_hf_model(copy.deepcopy(hf)).cuda()
        ours.attn_impl = impl
        if impl == "flex":
            ours.compile_blocks()
        logits = ours(ids, doc)
        logits.float().square().mean().backward()
        results[impl] = (logits.detach(), [p.grad for p in ours.parameters()])
    # fp32 on both paths, different summation orders (and exp2 in the flex kernel): errors relative to
    # each tensor's scale, so near-zero entries of a large-gradient tensor do not fail on rounding alone.
    ref = results["sdpa"][0]
    torch.testing.assert_close(results["flex"][0], ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
    for g_flex, g_sdpa in zip(results["flex"][1], results["sdpa"][1]):
        torch.testing.assert_close(g_flex, g_sdpa, atol=1e-4 * g_sdpa.abs().max().item(), rtol=1e-3)


@pytest.mark.gpu
def test_gpu_flex_prefill_equals_materialised_prefill_bf16():
    """The compiled-flex prefill (ALiBi fp32 inside the kernel) against the materialised fp32-bias path,
    in bf16 on CUDA, at offsets 0 and 128 (a second chunk through the block mask's offset)."""
    m = MPTForCausalLM(MPTConfig(d_model=256, n_heads=4, n_layers=2, vocab_size=128)).cuda()
    m.init_weights(generator=torch.Generator(device="cuda").manual_seed(0))
    m = m.to(torch.bfloat16).eval()
    ids = _ids(128, (2, 300)).cuda()
    out = {}
    for impl in ("math", "flex"):
        m.cached_prefill_impl = impl
        m.setup_cache(2, 320)
        with torch.no_grad():
            a = m.forward_cached(ids[:, :128], torch.arange(128, device="cuda"))
            b = m.forward_cached(ids[:, 128:], torch.arange(128, 300, device="cuda"), logits_to_keep=1)
        out[impl] = (a.float(), b.float())
        assert not m._prefill_flex_failed
    for x, y in zip(out["flex"], out["math"]):
        torch.testing.assert_close(x, y, atol=0.05 * y.abs().max().item(), rtol=0.05)


@pytest.mark.gpu
def test_gpu_reduce_overhead_decode_step_matches_eager():
    ours = from_hf_model(make_hf("mpt7b_keys")).cuda()
    prompt = _ids(128, (1, 9), seed=3).cuda()
    tokens = {}
    for compiled in (False, True):
        step = (
            torch.compile(ours.forward_cached, mode="reduce-overhead", fullgraph=True) if compiled else None
        )
        ours.setup_cache(1, 48)
        with torch.no_grad():
            logits = ours.forward_cached(prompt, torch.arange(9, device="cuda"))
            got = []
            for i in range(32):
                tok = logits[:, -1].argmax(-1, keepdim=True)
                got.append(tok.item())
                pos = torch.tensor([9 + i], device="cuda")
                logits = (step or ours.forward_cached)(tok, pos).clone()
        tokens[compiled] = got
    assert tokens[True] == tokens[False]
