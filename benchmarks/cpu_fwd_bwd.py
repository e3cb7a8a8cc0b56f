"""Forward+backward time of a model through the trainer's document-masked forward, no optimizer step.

What one training row costs the model itself, to compare with the trainer's tokens/s on the same
machine (RESULTS.md §6): ``--model`` loaded as the trainer loads it (``sft.model.models``), fp32, one row of
``--seq_len`` random token ids split into ``--docs`` equal documents (position ids restart, attention
never crosses a document: ``sft.model.models.forward_hidden``), mean cross-entropy over the row's next-token
targets, ``loss.backward()``. Median wall time of ``--iters`` steps after one warm-up step; gradients
are dropped after each step, weights never change.

    python benchmarks/cpu_fwd_bwd.py                       # SmolLM2-135M-Instruct, 1,024 tokens, 2 documents
    python benchmarks/cpu_fwd_bwd.py --model=tiny-llama --iters=2     # seconds: a smoke test
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `sft` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from sft.config import TrainConfig
from sft.model.models import forward_hidden, load_model_and_tokenizer


def row(seq_len: int, docs: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One packed row ``[1, seq_len]``: random ids, ``docs`` equal documents (the last takes the rest)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    size = seq_len // docs
    doc = (torch.arange(seq_len) // size).clamp(max=docs - 1)
    pos = torch.arange(seq_len) - doc * size
    return {"input_ids": ids, "document_ids": doc[None], "position_ids": pos[None]}


def main(argv: list[str] | None = None) -> int:
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft.argcheck import OneLineParser, float_in, int_in  # noqa: F401  one-line errors, checked ranges

    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seq_len", type=int_in(2), default=1024)
    p.add_argument("--docs", type=int_in(1), default=2)
    p.add_argument("--iters", type=int_in(1), default=3)
    args = p.parse_args(argv)
    cfg = dataclasses.replace(TrainConfig(), model=args.model, precision="fp32", max_len=args.seq_len)
    model, _ = load_model_and_tokenizer(cfg)
    model.train()
    batch = row(args.seq_len, args.docs, model.config.vocab_size)
    targets = batch["input_ids"][0, 1:]
    times = []
    for i in range(args.iters + 1):
        t = time.perf_counter()
        hidden, head = forward_hidden(model, batch)
        loss = F.cross_entropy(head.logits(hidden[0, :-1]), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(
        f"{args.model}: {args.seq_len} tokens in {args.docs} documents, {torch.get_num_threads()} threads, "
        f"attention {getattr(model.config, '_attn_implementation', '-')}: "
        f"steps {', '.join(f'{x:.2f}' for x in times)} s; median {med:.2f} s = {args.seq_len / med:.1f} tokens/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
