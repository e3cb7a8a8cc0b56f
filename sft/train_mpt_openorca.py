"""Full-parameter fine-tune of MPT-7B on a streamed subset of OpenOrca (system prompts kept).

    python sft/train_mpt_openorca.py                         # first 20,000 rows of Open-Orca/OpenOrca
    python sft/train_mpt_openorca.py --limit=100000          # the subset size is a flag
    python sft/train_mpt_openorca.py --smoke                 # tiny random MPT on the bundled sample (CPU)

Only the first ``--limit`` rows are streamed (``datasets`` streaming): the 4 M rows are never downloaded
whole. Same training set-up as ``train_mpt_guanaco.py``.
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # repository root instead of sft/

import dataclasses  # noqa: E402

from sft.config import TrainConfig  # noqa: E402
from sft.train_mpt_guanaco import DEFAULTS as MPT_DEFAULTS  # noqa: E402
from sft.train_mpt_guanaco import SMOKE  # noqa: E402
from sft.trainer import main  # noqa: E402

DEFAULTS: TrainConfig = dataclasses.replace(
    MPT_DEFAULTS,
    data="Open-Orca/OpenOrca",
    fmt="openorca",
    limit=20_000,
    epochs=1.0,
    eval_size=500,
    eval_every=100,
)

if __name__ == "__main__":
    raise SystemExit(main(DEFAULTS, smoke=SMOKE))
