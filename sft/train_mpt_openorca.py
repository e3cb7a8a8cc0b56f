"""Full-parameter fine-tune of MPT-7B on a streamed subset of OpenOrca (system prompts kept).

    python sft/train_mpt_openorca.py                         # first 20,000 rows of Open-Orca/OpenOrca
    python sft/train_mpt_openorca.py --limit=100000          # the subset size is a flag
    python sft/train_mpt_openorca.py --smoke                 # tiny random MPT on a bundled OpenOrca sample (CPU)

Only the first ``--limit`` rows are streamed (``datasets`` streaming): the 4 M rows are never downloaded
whole. Same training set-up as ``train_mpt_guanaco.py``. ``--smoke`` trains on ``sft/openorca-sample.jsonl``
(16 rows in OpenOrca's columns, some with an empty system prompt) through the ``openorca`` adapter and the
recipe's template, so the OpenOrca path itself is what the smoke run checks.
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # repository root instead of sft/

import dataclasses  # noqa: E402

from sft.config import TrainConfig  # noqa: E402
from sft.data.sample_data import OPENORCA_SAMPLE  # noqa: E402
from sft.train_mpt_guanaco import DEFAULTS as MPT_DEFAULTS  # noqa: E402
from sft.train_mpt_guanaco import SMOKE as MPT_SMOKE  # noqa: E402
from sft.training.trainer import main  # noqa: E402

DEFAULTS: TrainConfig = dataclasses.replace(
    MPT_DEFAULTS,
    data="Open-Orca/OpenOrca",
    fmt="openorca",
    limit=20_000,
    epochs=1.0,
    eval_size=500,
    eval_every=100,
)

# the Guanaco recipe's tiny-model smoke settings, on OpenOrca-format rows through the OpenOrca adapter and
# the recipe's template; rows of up to 1,024 tokens, so every sample row fits the tiny model's byte tokenizer
SMOKE = dict(MPT_SMOKE, data=str(OPENORCA_SAMPLE), fmt="openorca", template=DEFAULTS.template, max_len=1024)

if __name__ == "__main__":
    raise SystemExit(main(DEFAULTS, smoke=SMOKE))
