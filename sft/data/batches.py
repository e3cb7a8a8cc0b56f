"""The trainer's data feed: ``--data`` specs -> prepared mixture -> packed rows -> the seeded micro-batch stream.

- :func:`data_sources` parses ``--data`` / ``--eval_data`` (sft/data/mixture.py) into source specs;
- :func:`prepare` renders, splits, mixes and packs them: ``(Mixture, train_rows, eval_batches)``;
- :class:`MicroBatches` is micro-batch ``i`` of the endless, seeded, epoch-shuffled stream over the rows
  (a pure function of the seed, so a checkpoint's data position is its step).
"""

from __future__ import annotations

import torch

from sft.config import TrainConfig
from sft.data.schema import DataError


def data_sources(cfg: TrainConfig):
    """``(train specs, eval specs)`` parsed from ``--data`` / ``--eval_data`` (sft/data/mixture.py); one-line
    ConfigError / DataError for a bad spec or a missing file."""
    from sft.data.mixture import parse_sources

    defaults = {"fmt": cfg.fmt, "fields": cfg.fields, "limit": cfg.limit, "bad_rows": cfg.bad_rows}
    specs = parse_sources(cfg.data, what="--data", defaults=defaults)
    evals = (
        parse_sources(cfg.eval_data, what="--eval_data", defaults=defaults, weighted=False)
        if cfg.eval_data
        else []
    )
    return specs, evals


def prepare(cfg: TrainConfig, tokenizer):
    """Render, split, mix and return ``(Mixture, train_rows, eval_batches)`` (sft/data/mixture.py).

    ``train_rows``: a Batch dict of ``[R, T]`` tensors (packed) or the list of training Samples (padded
    per micro-batch). ``eval_batches``: held-out source name -> a list of Batch dicts of at most
    ``micro_batch`` rows, fixed order (``--eval_batches`` caps each source).
    """
    from sft.data.mixture import prepare_mixture
    from sft.data.packing import pack, pad_collate

    specs, eval_specs = data_sources(cfg)
    eval_size = int(cfg.eval_size) if cfg.eval_size >= 1 else cfg.eval_size
    prepared = prepare_mixture(
        specs,
        tokenizer,
        eval_specs=eval_specs,
        template=cfg.template,
        max_len=cfg.max_len,
        overlong=cfg.overlong,
        supervise=cfg.supervise,
        eval_size=eval_size,
        seed=cfg.seed,
    )
    if not prepared.train:
        raise DataError("no training sample left after the held-out split", source=cfg.data)

    pad_id = pad_token_id(tokenizer)

    def packed(samples):
        return _as_batch(pack(samples, cfg.max_len, pad_id))

    train_rows = packed(prepared.train) if cfg.packing else list(prepared.train)
    eval_batches = {}
    for name, samples in prepared.eval_by_source.items():
        if not samples:
            continue
        if cfg.packing:
            ev = packed(samples)
            n = ev["input_ids"].size(0)
            batches = [
                {k: v[i : i + cfg.micro_batch] for k, v in ev.items()} for i in range(0, n, cfg.micro_batch)
            ]
        else:
            batches = [
                _as_batch(pad_collate(samples[i : i + cfg.micro_batch], pad_id))
                for i in range(0, len(samples), cfg.micro_batch)
            ]
        eval_batches[name] = batches[: cfg.eval_batches] if cfg.eval_batches else batches
    return prepared, train_rows, eval_batches


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad id, else 0 (never a target: targets are IGNORE_INDEX there)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _as_batch(x) -> dict[str, torch.Tensor]:
    """A Batch dict from ``pack``'s output (a Batch already, or a list of rows for ``collate_rows``)."""
    if isinstance(x, dict):
        return x
    from sft.data.packing import collate_rows

    return collate_rows(list(x))


class MicroBatches:
    """Micro-batch ``i`` of the endless, seeded, epoch-shuffled stream over the training rows.

    Epoch ``e`` visits the rows in the order ``torch.randperm(R, generator=seed + e)``; the epochs are
    concatenated and micro-batch ``i`` is rows ``i*mb .. i*mb + mb - 1`` of that stream, so every micro-batch
    is full (the last one of an epoch takes the first rows of the next): one shape for the compiled blocks.
    ``pad_to``: padded (unpacked) micro-batches are padded to this length instead of their longest row.
    """

    def __init__(self, rows, cfg: TrainConfig, pad_id: int = 0, pad_to: int | None = None):
        self.rows, self.cfg, self.pad_id, self.pad_to = rows, cfg, pad_id, pad_to
        self.n_rows = rows["input_ids"].size(0) if isinstance(rows, dict) else len(rows)
        self.per_epoch = self.n_rows / cfg.micro_batch  # micro-batches per epoch (fractional)
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._order = (epoch, torch.randperm(self.n_rows, generator=g))
        return self._order[1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mb, n = self.cfg.micro_batch, self.n_rows
        idx: list[int] = []
        while len(idx) < mb:
            epoch, j = divmod(i * mb + len(idx), n)
            idx.extend(self.order(epoch)[j : j + min(mb - len(idx), n - j)].tolist())
        if isinstance(self.rows, dict):
            return {k: v[idx] for k, v in self.rows.items()}
        from sft.data.packing import pad_collate

        return _as_batch(pad_collate([self.rows[k] for k in idx], self.pad_id, self.pad_to))
