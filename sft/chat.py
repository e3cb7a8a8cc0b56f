"""Talk to a model from the shell, through the same chat template as training.

    python -m sft.chat runs/<run>/final [--template=NAME] [--max_new_tokens=256] [--temperature=0.7]
                       [--top_k=50] [--top_p=0.9] [--seed=0] [--system="..."] [--once "prompt"]
                       [--allow_pickle]

MODEL is anything ``sft.model.models.load_model_and_tokenizer`` takes: a run's ``final/`` folder, a local
Hugging Face folder, a ``.gguf`` file, ``smollm2-135m-instruct``, a cached hub id, a tiny preset.

Template: by default the tokenizer's own chat template, which for a run's ``final/`` is the
training template (the trainer attaches it to the tokenizer before saving); ``--template`` names one
of ``sft.data.render.TEMPLATES`` or gives jinja. Every turn is rendered with ``sft.data.render.render_prompt``
over the whole conversation so far, so the model sees exactly the token layout it was trained on.
Decoding stops at EOS and at the template's end-of-turn token (``sft.data.render.stop_token_ids``); when
that marker is several tokens of this tokenizer, the reply is cut at its text instead.

REPL: one line per user turn; ``/reset`` starts a new conversation, ``/quit`` (or EOF) ends.
``--once "prompt"`` answers one prompt and exits (scripting, tests).

Bad input (a model that does not exist, a pickle-only folder without ``--allow_pickle``, a template that
cannot be rendered, a run folder given instead of its ``final/``, an option out of range: ``--max_new_tokens``
>= 1, ``--temperature`` >= 0, ``--top_k`` >= 0, ``--top_p`` in (0, 1], ``--max_seq_len`` from 2 to the model's
positions, ``--device=cuda`` without a GPU, a ``--once`` prompt longer than the cache) is one ``error:``
line on stderr and exit status 2; Ctrl-C ends with exit status 130.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import torch

from sft.argcheck import OneLineParser, float_in, int_in
from sft.data.render import end_of_turn_text, render_prompt, stop_token_ids
from sft.data.schema import Conversation
from sft.model.generate import Generator, SamplingConfig, cached_decoder

log = logging.getLogger(__name__)


class ChatError(ValueError):
    """A turn that cannot be answered (the conversation does not fit the cache); the message is one line."""


def _max_positions(config, default: int = 2048) -> int:
    for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


class ChatSession:
    """A multi-turn conversation with one model.

    ``reply(text)`` appends the user turn, renders the whole conversation with ``render_prompt``
    (kept as ``last_prompt_ids``), decodes with :class:`sft.model.generate.Generator` (static KV cache,
    batch 1, ``max_seq_len`` positions), appends the assistant turn and returns its text (special
    tokens and the end-of-turn marker removed, surrounding whitespace stripped).
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: str | None = None,
        *,
        max_new_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        system: str | None = None,
        max_seq_len: int | None = None,
        compile: bool | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or SamplingConfig()
        self.system = system
        self.stop_ids = stop_token_ids(tokenizer, template)
        self.end_text = end_of_turn_text(tokenizer, template)
        config = getattr(model, "config", None)
        self.max_seq_len = max_seq_len or min(_max_positions(config), 4096)
        self.generator = Generator(cached_decoder(model), max_seq_len=self.max_seq_len, compile=compile)
        self.messages: Conversation = []
        self.last_prompt_ids: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message, if any, stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> str:
        conv = [*self.messages, {"role": "user", "content": text}]
        ids = render_prompt(conv, self.tokenizer, self.template)
        room = self.max_seq_len - len(ids)
        if room <= 0:
            raise ChatError(
                f"the conversation is {len(ids)} tokens, the cache holds {self.max_seq_len} "
                "(--max_seq_len): /reset to start over"
            )
        self.last_prompt_ids = ids
        out = self.generator.generate([ids], min(self.max_new_tokens, room), self.sampling, self.stop_ids)
        new = out.tokens[0]
        if out.finish[0] == "stop":
            new = new[:-1]
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        if self.end_text and self.end_text in answer:  # a multi-token end-of-turn marker
            answer = answer[: answer.index(self.end_text)]
        answer = answer.strip()
        self.messages = [*conv, {"role": "assistant", "content": answer}]
        return answer


def load(model: str, device: str = "auto", dtype: str = "auto", allow_pickle: bool = False):
    """``(model in eval mode on the device, tokenizer)`` through ``sft.model.models.load_model_and_tokenizer``.

    A run folder given instead of its ``final/`` is a RunError saying so (:func:`sft.training.runs.check_not_run_folder`).
    """
    from sft.config import TrainConfig
    from sft.model.models import load_model_and_tokenizer
    from sft.training.runs import check_not_run_folder

    check_not_run_folder(model)

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else (device if device != "auto" else "cpu")
    )
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    cfg = replace(
        TrainConfig(), model=model, precision="bf16" if dtype == "bf16" else "fp32", allow_pickle=allow_pickle
    )
    m, tok = load_model_and_tokenizer(cfg)
    return m.to(dev).eval(), tok


def parse_args(argv=None):
    """The options, each range checked while parsing (a bad value: one ``error:`` line, exit 2)."""
    p = OneLineParser(prog="python -m sft.chat", description="Chat with a model (e.g. runs/<run>/final).")
    p.add_argument(
        "model", help="run final/ folder, HF folder, .gguf, smollm2-135m-instruct, hub id, tiny preset"
    )
    p.add_argument(
        "--template", default=None, help="chat template name or jinja (default: the tokenizer's own)"
    )
    p.add_argument("--max_new_tokens", type=int_in(1), default=256)
    p.add_argument("--temperature", type=float_in(0), default=0.0, help=">= 0; 0 = greedy")
    p.add_argument("--top_k", type=int_in(0), default=None, help=">= 1 (0: no limit)")
    p.add_argument("--top_p", type=float_in(0, 1, low_open=True), default=None, help="in (0, 1]")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument(
        "--max_seq_len",
        type=int_in(2),
        default=None,
        help="KV cache positions (default: model max, <= 4096; at most the model's positions)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--once", default=None, metavar="PROMPT", help="answer one prompt and exit")
    p.add_argument(
        "--allow_pickle",
        action="store_true",
        help="allow .bin/.pt (pickle) weights; safetensors/GGUF otherwise",
    )
    return p.parse_args(argv)


def main(argv=None, stdin=None, stdout=None) -> ChatSession:
    """Run the chat; returns the session (its ``messages`` and ``last_prompt_ids``) for scripting."""
    from sft.config import ConfigError

    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda: no CUDA device is visible here (use --device=cpu or auto)")
    model, tok = load(args.model, args.device, args.dtype, args.allow_pickle)
    limit = _max_positions(getattr(model, "config", None), default=0)
    if args.max_seq_len is not None and limit and args.max_seq_len > limit:
        raise ConfigError(f"--max_seq_len={args.max_seq_len} exceeds the model's {limit} positions")
    session = ChatSession(
        model,
        tok,
        args.template,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed),
        system=args.system,
        max_seq_len=args.max_seq_len,
    )
    if args.once is not None:
        stdout.write(session.reply(args.once) + "\n")
        return session
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            session.reset()
            continue
        try:
            stdout.write(session.reply(line) + "\n")
        except ChatError as e:
            stdout.write(f"[{e}]\n")
        stdout.flush()
    return session


def cli(argv=None, stdin=None, stdout=None) -> int:
    """``python -m sft.chat``: :func:`main`, with bad input as one ``error:`` line on stderr (exit 2) and
    Ctrl-C as ``interrupted`` (exit 130) instead of a traceback. Returns the exit status."""
    from sft.config import ConfigError, error_exit
    from sft.data.render import TemplateError
    from sft.data.schema import DataError
    from sft.model.models import ModelError
    from sft.training.runs import RunError

    try:
        main(argv, stdin, stdout)
    except SystemExit as e:  # a usage error (its line already printed) or --help
        return int(e.code or 0)
    except (ModelError, TemplateError, RunError, DataError, ConfigError, ChatError) as e:
        return error_exit(e)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(cli())
