"""Decoding: a static KV cache, a compiled one-token step, and the sampling options users expect.

The decode loop works over any *cached decoder*: a module exposing

- ``setup_cache(batch_size, max_seq_len, dtype, device)``: allocate a static KV cache of
  ``[batch_size, heads, max_seq_len, head_dim]`` per layer (addresses never change afterwards,
  which is what lets CUDA graphs replay the step);
- ``forward_cached(input_ids [B, t] long, input_pos [t] long) -> logits [B, t, V]``: write the
  keys/values of positions ``input_pos`` (contiguous, shared by the whole batch) into the cache
  and attend, for query position ``p``, to every cached position ``s <= p``. Optionally a keyword
  ``logits_to_keep: int`` (logits of the last positions only), which the prefill then uses.

Our MPT (``sft.model.mpt``) implements it natively; :class:`LlamaCached` gives any Llama-family
transformers causal LM (Llama, SmolLM2, Mistral without sliding window, Qwen2/3) the same interface.

Why our own Llama forward instead of transformers' ``StaticCache``: its API moved between the
versions this project meets (5.17 on the GPU image: ``past_key_values`` + ``cache_position``;
5.24 here: ``cache=`` and a position counter kept *inside* the cache), so a forward keyed on an
explicit ``input_pos`` would have to poke cache internals. :class:`LlamaCached` reuses the HF
model's own submodules (projections, norms, MLP, rotary table), so weights are shared, not
copied, and only attention + cache bookkeeping (~40 lines) are ours; a CPU test pins its greedy
tokens to ``generate``'s.

Batches: prompts are *left-aligned* (every sequence starts at position 0; lengths may differ).
The shortest prompt length is prefilled in one forward; after that every step feeds, per
sequence, either its next prompt token (still inside its prompt: the sampled token is discarded)
or its last generated token. No padding ever enters the cache, so each sequence's tokens equal
what it would get alone (greedy). Stopping is per sequence (EOS or the template's end-of-turn ids).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sft.model.family import LLAMA_LIKE, family

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class SamplingConfig:
    """How the next token is chosen from the last position's logits.

    ``temperature <= 0`` means greedy (argmax; ``top_k``/``top_p`` are then irrelevant).
    Otherwise logits are divided by ``temperature``, restricted to the ``top_k`` largest
    (``None`` or 0: no limit), then to the smallest set whose probability mass reaches ``top_p``
    (``None`` or 1.0: no limit; the most likely token is always kept), and sampled with a
    ``torch.Generator`` seeded by ``seed`` (same seed, same prompts, same batch -> same tokens).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits outside top-k / top-p to ``-inf``.

    ``logits``: ``[B, V]`` float (already divided by the temperature). Returns a new ``[B, V]``
    tensor; at least one finite entry per row (the argmax) always survives.
    """
    logits = logits.clone()
    vocab = logits.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches top_p: keeps the first always.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids ``[B]`` (long) from ``logits [B, V]`` under ``cfg``."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Llama-family cached decoder over a transformers model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaCached(nn.Module):
    """Static-KV-cache forward over a transformers Llama-family causal LM (weights shared).

    ``hf_model``: e.g. ``LlamaForCausalLM`` (``.model.embed_tokens / layers / norm / rotary_emb``,
    ``.lm_head``). Each layer's attention is recomputed here with SDPA against the static cache
    (grouped-query heads via ``enable_gqa``); RoPE cos/sin come from the model's own
    ``rotary_emb`` (so any rope scaling it implements is honoured), tabulated once per
    ``setup_cache`` for positions ``0..max_seq_len-1``.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        if not family(hf_model).llama_like:
            raise ValueError(f"LlamaCached supports {sorted(LLAMA_LIKE)}, not model_type={cfg.model_type!r}")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            # A full static cache attends past the window: say so (identical while shorter than it).
            log.warning("sliding_window=%s is ignored: results differ past the window", cfg.sliding_window)
        self.hf = hf_model
        self.config = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_seq_len = 0
        self.max_batch_size = 0

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate K/V caches ``[batch_size, n_kv_heads, max_seq_len, head_dim]`` per layer (zeros)
        and the RoPE table ``[max_seq_len, head_dim]``. ``dtype``/``device`` default to the weights'."""
        p = next(self.hf.parameters())
        dtype = dtype or p.dtype
        device = torch.device(device) if device is not None else p.device
        n_layers = len(self.hf.model.layers)
        shape = (batch_size, self.n_kv_heads, max_seq_len, self.head_dim)
        # Buffers of this module: torch.compile/cudagraphs treat them as static addresses.
        for i in range(n_layers):
            self.register_buffer(
                f"k_cache_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False
            )
            self.register_buffer(
                f"v_cache_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False
            )
        pos = torch.arange(max_seq_len, device=device)[None]
        dummy = torch.zeros(1, max_seq_len, self.head_dim, dtype=dtype, device=device)
        with torch.no_grad():
            cos, sin = self.hf.model.rotary_emb(dummy, position_ids=pos)
        self.register_buffer("rope_cos", cos[0].to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin[0].to(dtype), persistent=False)
        self.max_seq_len, self.max_batch_size = max_seq_len, batch_size

    def release_cache(self) -> None:
        """Drop the K/V caches and RoPE tables of ``setup_cache`` (it allocates them again)."""
        for name in [n for n in self._buffers if n.startswith(("k_cache_", "v_cache_", "rope_"))]:
            delattr(self, name)

    def forward_cached(
        self, input_ids: torch.Tensor, input_pos: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """``input_ids [B, t]``, ``input_pos [t]`` (contiguous) -> logits ``[B, t, V]`` (weights' dtype);
        ``[B, logits_to_keep, V]`` for the last positions only when ``logits_to_keep > 0`` (a prefill
        needs one: the LM head over every prompt position would cost ~20% of a small model's prefill)."""
        m = self.hf.model
        bsz, t = input_ids.shape
        h = m.embed_tokens(input_ids)
        cos = self.rope_cos[input_pos][None, None]  # [1, 1, t, hd]
        sin = self.rope_sin[input_pos][None, None]
        # Query at position p sees cached keys s <= p; entries past p are stale or zero.
        # Compiled (the t=1 step): attend the whole static cache under a mask, shapes never change.
        # Eager (prefill): attend only keys 0..last position, causal kernel when starting at 0.
        n_keys, mask, causal = self.max_seq_len, None, False
        if torch.compiler.is_compiling() or t == 1:
            mask = torch.arange(n_keys, device=input_ids.device)[None, :] <= input_pos[:, None]
        else:
            first, n_keys = int(input_pos[0]), int(input_pos[-1]) + 1
            if first == 0:
                causal = True
            else:
                mask = torch.arange(n_keys, device=input_ids.device)[None, :] <= input_pos[:, None]
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(bsz, t, -1, self.head_dim)
            k = attn.k_proj(x).view(bsz, t, -1, self.head_dim)
            v = attn.v_proj(x).view(bsz, t, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache = getattr(self, f"k_cache_{i}")
            v_cache = getattr(self, f"v_cache_{i}")
            k_cache[:bsz].index_copy_(2, input_pos, k.to(k_cache.dtype))
            v_cache[:bsz].index_copy_(2, input_pos, v.to(v_cache.dtype))
            o = F.scaled_dot_product_attention(
                q,
                k_cache[:bsz, :, :n_keys],
                v_cache[:bsz, :, :n_keys],
                attn_mask=mask,
                is_causal=causal,
                scale=getattr(attn, "scaling", self.head_dim**-0.5),
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(bsz, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.hf.lm_head(m.norm(h))


def cached_decoder(model: nn.Module) -> nn.Module:
    """The cached decoder for ``model``: itself if it has ``forward_cached``; our MPT built from a
    transformers ``MptForCausalLM`` (``sft.model.mpt.from_hf_model``); or :class:`LlamaCached`."""
    if hasattr(model, "forward_cached"):
        return model
    if family(model).hf_mpt:
        from sft.model.mpt import from_hf_model

        return from_hf_model(model)
    return LlamaCached(model)


# ---------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class GenerateOutput:
    """Result of :meth:`Generator.generate`.

    ``tokens[b]``: the new ids of sequence b, ending with its stop id if it stopped (``finish[b]
    == "stop"``) or ``max_new_tokens`` long (``"length"``). ``prefill_s``: wall time of the first
    forward up to the first sampled token; ``decode_s``: the rest (seconds, device-synchronised).
    """

    tokens: list[list[int]]
    finish: list[str]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)


def release_cache(model: nn.Module) -> None:
    """Free what ``setup_cache`` attached to a cached decoder (its ``release_cache``, if it has one): after
    this the model holds no KV cache buffers. :func:`generate` calls it when it returns or raises."""
    release = getattr(model, "release_cache", None)
    if release is not None:
        release()


def _mark_static_tensors(model: nn.Module) -> None:
    """Mark every tensor held as a plain module attribute (e.g. a KV cache not registered as a
    buffer) as a static address, so CUDA graphs update it in place instead of copying it into a
    graph-owned placeholder every step (or refusing to record because an input is mutated)."""
    for mod in model.modules():
        for value in vars(mod).values():
            if torch.is_tensor(value) and value.is_cuda:
                torch._dynamo.mark_static_address(value)


def apply_decode_inductor_settings() -> None:
    """gpt-fast's inductor settings for a compiled decode step (process-wide, set before compiling):
    coordinate-descent tuning of each generated kernel's launch parameters (the memory-bound
    LayerNorm/GELU/softmax kernels of a one-token step), unique kernel names (readable profiles), and
    the on-disk FX graph cache (a second process skips most of the compile)."""
    import torch._inductor.config as ind

    ind.coordinate_descent_tuning = True
    ind.triton.unique_kernel_names = True
    ind.fx_graph_cache = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Prefill + compiled one-token decode over a cached decoder.

    ``model``: anything with ``setup_cache``/``forward_cached`` (see module docstring), in eval
    mode, on ``device``. ``compile``: ``None`` = compile the t=1 step with
    ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs; gpt-fast's inductor
    settings, :func:`apply_decode_inductor_settings`) on CUDA and run eager on CPU.
    ``compile_mode``: the inductor mode of that CUDA compile: ``"reduce-overhead"`` or ``"max-autotune"``
    (also CUDA graphs, plus autotuned Triton matmul templates for the one-token GEMVs; a longer compile).
    ``compile_backend``: a dynamo backend other than inductor (e.g. ``"aot_eager"``: CPU tests of
    the trace without a C++ compiler). ``compile_prefill``: also compile the prefill as one dynamic
    graph (rarely useful: our MPT's eager prefill already runs compiled FlexAttention on CUDA).
    The cache is (re)allocated when the batch size or ``max_seq_len`` changes; CUDA graphs are
    recorded per batch size, so keep shapes fixed when timing.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool | None = None,
        compile_prefill: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str = "reduce-overhead",
    ):
        self.model = model
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        self.max_seq_len = max_seq_len
        self._cache_key: tuple[int, int] | None = None
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = compile
        # Optional extension of the contract: logits for the last position only (see LlamaCached).
        self._keep_kw = "logits_to_keep" in inspect.signature(model.forward_cached).parameters
        if compile:
            if self.device.type == "cuda":
                apply_decode_inductor_settings()
            mode = compile_mode if self.device.type == "cuda" else None
            if compile_backend != "inductor":
                mode = None  # modes are inductor options
            self._step = torch.compile(self._decode_step, mode=mode, fullgraph=True, backend=compile_backend)
        else:
            self._step = self._decode_step
        self._positions: torch.Tensor | None = None
        # Prefill shapes vary with the prompt: dynamic=True avoids one compile per length.
        self._prefill = torch.compile(self._prefill_fn, dynamic=True) if compile_prefill else self._prefill_fn

    def _decode_step(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.forward_cached(x, pos)[:, -1].float()

    def _prefill_fn(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self._keep_kw:
            return self.model.forward_cached(x, pos, logits_to_keep=1)[:, -1].float()
        return self.model.forward_cached(x, pos)[:, -1].float()

    def ensure_cache(self, batch_size: int) -> None:
        """Allocate the static cache for ``batch_size`` unless it already is."""
        key = (batch_size, self.max_seq_len)
        if self._cache_key != key:
            self.model.setup_cache(batch_size, self.max_seq_len, self.dtype, self.device)
            self._cache_key = key
            # Prefill positions live on the device (no host-to-device copy per prompt).
            self._positions = torch.arange(self.max_seq_len, device=self.device)
            if self.compiled and self.device.type == "cuda":
                _mark_static_tensors(self.model)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids [B, t]`` at positions ``0..t-1``; return last-position logits ``[B, V]`` fp32."""
        self.ensure_cache(input_ids.shape[0])
        return self._prefill(input_ids, self._positions[: input_ids.shape[1]])

    @torch.inference_mode()
    def step(self, x: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """One decode step: ``x [B, 1]`` at position ``pos`` (int, or a long ``[1]`` device tensor)
        -> logits ``[B, V]`` fp32 (a copy: CUDA graphs overwrite their output on the next replay).

        No host sync: ``pos`` as an int becomes a device tensor through a fill kernel. If the compiled step
        raises, a warning is logged and this and later steps run eagerly (same numbers).
        """
        if not torch.is_tensor(pos):
            # A fill kernel with the value as an argument: no host-to-device copy (a pageable one can
            # make the host wait for the GPU), and a fresh non-view tensor (no guard on a storage offset).
            pos = torch.full((1,), pos, dtype=torch.long, device=self.device)
        if not self.compiled:
            return self._step(x, pos)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = self._step(x, pos)
        except Exception as e:  # a compile/graph failure must not stop generation: eager is exact
            log.warning("compiled decode step failed (%s: %s); decoding eagerly from now on",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
            self.compiled, self._step = False, self._decode_step
            return self._step(x, pos)
        return out.clone() if self.device.type == "cuda" else out

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_ids: Sequence[int] = (),
        check_every: int | None = None,
    ) -> GenerateOutput:
        """Generate up to ``max_new_tokens`` per prompt (prompts left-aligned, lengths may differ).

        ``stop_ids``: ids that end a sequence (EOS, end-of-turn); the stop id is kept in the output.
        ``check_every``: how often (in steps) to synchronise and test whether all sequences
        stopped (default: every step on CPU, every 8 on CUDA so the host runs ahead of the GPU).
        Requires ``max(len(prompt)) + max_new_tokens <= max_seq_len``.
        """
        sampling = sampling or SamplingConfig()
        bsz = len(prompts)
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError("every prompt needs at least one token")
        total = max(lens) + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"longest prompt {max(lens)} + {max_new_tokens} new tokens > max_seq_len {self.max_seq_len}"
            )
        if check_every is None:
            check_every = 8 if self.device.type == "cuda" else 1
        dev = self.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(sampling.seed)

        # seq[b, p] = token at position p: the prompt, then generated tokens (written as we go).
        seq = torch.zeros(bsz, total, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            seq[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        lens_t = torch.tensor(lens, device=dev)
        stop_t = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
        done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        n_gen = torch.zeros(bsz, dtype=torch.long, device=dev)

        t0 = time.perf_counter()
        start = min(lens)
        logits = self.prefill(seq[:, :start])
        prefill_s = 0.0
        steps = 0
        # Position p = the position of the token being produced.
        for p in range(start, total):
            nxt = sample_next(logits, sampling, gen)
            in_prompt = p < lens_t
            active = ~in_prompt & ~done & (n_gen < max_new_tokens)
            nxt = torch.where(in_prompt, seq[:, p], nxt)
            seq[:, p] = nxt
            n_gen += active.long()
            done |= active & torch.isin(nxt, stop_t)
            done |= n_gen >= max_new_tokens
            if p == start:
                _sync(dev)
                prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            if p + 1 >= total or ((p - start) % check_every == 0 and bool(done.all())):
                break
            logits = self.step(seq[:, p : p + 1], p)
            steps += 1
        _sync(dev)
        decode_s = time.perf_counter() - t1

        rows = seq.tolist()
        n_gen_l = n_gen.tolist()
        stop_set = set(stop_ids)
        tokens, finish = [], []
        for b in range(bsz):
            new = rows[b][lens[b] : lens[b] + n_gen_l[b]]
            cut = next((i for i, tok in enumerate(new) if tok in stop_set), None)
            if cut is not None:
                tokens.append(new[: cut + 1])
                finish.append("stop")
            else:
                tokens.append(new)
                finish.append("length")
        return GenerateOutput(tokens, finish, prefill_s, decode_s, steps)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] = (),
    *,
    max_seq_len: int | None = None,
    compile: bool | None = None,
) -> GenerateOutput:
    """One-shot convenience: wrap ``model`` (:func:`cached_decoder`), build a :class:`Generator`
    sized for these prompts, and generate. Leaves nothing behind: the KV caches are released
    (:func:`release_cache`) whether it returns or raises."""
    dec = cached_decoder(model)
    max_seq_len = max_seq_len or max(len(p) for p in prompts) + max_new_tokens
    try:
        return Generator(dec, max_seq_len=max_seq_len, compile=compile).generate(
            prompts, max_new_tokens, sampling, stop_ids
        )
    finally:
        release_cache(dec)


@torch.no_grad()
def greedy(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    autocast=None,
    tokenizer=None,
) -> list[int]:
    """The greedy answer to one prompt: its new ids, ending with a stop id when it stopped within
    ``max_new_tokens`` (what the trainer's samples and stop rate and the notebooks' fixed prompts decode with).

    A transformers model (it has ``generate`` and a ``generation_config``) decodes through its ``generate``:
    ``prompt_ids`` put on ``device`` (default: the weights' device), under ``autocast`` (a no-argument context
    factory, e.g. the trainer's bf16 autocast; None: none), with the pad id of ``tokenizer``, else the first stop
    id, else 0. Any other model (our MPT, LoRA-wrapped or not: no ``generate`` of its own) decodes through
    :func:`generate`, on its weights' device and without autocast: eagerly (a Generator sized for this one
    prompt would recompile its step for every prompt length; no CUDA graphs stay alive), its KV cache freed.
    """
    ids = [int(t) for t in prompt_ids]
    stops = [int(t) for t in stop_ids]
    if hasattr(model, "generate") and hasattr(model, "generation_config"):
        device = device if device is not None else next(model.parameters()).device
        pad = getattr(tokenizer, "pad_token_id", None)
        x = torch.tensor([ids], device=device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=pad if pad is not None else (stops or [0])[0],
            )
        return y[0, len(ids) :].tolist()
    return list(generate(model, [ids], max_new_tokens, stop_ids=stops, compile=False).tokens[0])


# ---------------------------------------------------------------------------------------------
# Baseline timing


@torch.inference_mode()
def hf_generate_baseline(
    hf_model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, repeats: int = 3, warmup: int = 1
) -> dict:
    """Time transformers' ``generate`` (greedy, exactly ``max_new_tokens``, no early stop).

    ``input_ids [B, t]`` on the model's device. Returns seconds (medians over ``repeats`` after
    ``warmup`` runs): ``ttft_s`` = ``generate(max_new_tokens=1)``; ``total_s`` for
    ``max_new_tokens``; ``per_token_s`` = ``(total_s - ttft_s) / (max_new_tokens - 1)``; and
    ``tokens`` = the generated ids ``[B, max_new_tokens]`` of the last run (for checking).
    """
    device = input_ids.device
    attn = torch.ones_like(input_ids)
    pad = getattr(hf_model.generation_config, "pad_token_id", None)
    kw = dict(do_sample=False, attention_mask=attn, pad_token_id=pad if pad is not None else 0)

    def run(n):
        _sync(device)
        t = time.perf_counter()
        out = hf_model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        return time.perf_counter() - t, out

    for _ in range(warmup):
        run(min(max_new_tokens, 4))
    ttft = sorted(run(1)[0] for _ in range(repeats))[repeats // 2]
    totals, out = [], None
    for _ in range(repeats):
        dt, out = run(max_new_tokens)
        totals.append(dt)
    total = sorted(totals)[repeats // 2]
    per_tok = (total - ttft) / max(max_new_tokens - 1, 1)
    return {"ttft_s": ttft, "total_s": total, "per_token_s": per_tok, "tokens": out[:, input_ids.shape[1] :]}
