"""Render a ``Conversation`` through a chat template into ``Sample(input_ids, labels)``.

Contract of ``render`` (see CONTRACTS.md, "Sample"):

- ``input_ids`` are the tokens of ``tokenizer.apply_chat_template(conversation, tokenize=False)``
  (transformers' sandboxed jinja, for the tokenizer's own template and for ours alike), tokenized
  once with ``add_special_tokens=False``; a BOS is prepended only when the tokenizer adds one by
  default and the rendered text does not already start with it: exactly one BOS where the model uses one.
- ``labels[i] == input_ids[i]`` for the tokens of each assistant reply plus the end-of-turn marker that
  closes it (what teaches the model to stop); ``IGNORE_INDEX`` elsewhere. Labels never depend on the
  pad id, so a tokenizer whose pad equals its EOS still has its EOS labels supervised.

How the mask is derived (from the rendered structure, never by searching for marker token ids): for
assistant message ``i`` we render ``P = messages[:i]`` with the generation prompt and
``F = messages[:i+1]`` without; ``F`` must extend ``P`` and the whole conversation must extend ``F``
(a prefix-stable template). The characters ``F[len(P):]`` minus trailing whitespace are the reply and
its end-of-turn marker. Characters map to tokens with the fast tokenizer's offsets: token ``j`` covers
the characters from the end of token ``j-1`` to its own end (so leading spaces, which byte-level BPE
offsets trim, belong to the token that carries them); a token is supervised iff that range overlaps
a reply span.

Chat fields (tool calls, tool results, reasoning, the row's ``tools`` and other template keyword arguments;
see ``sft.data.formats``) go to the template as the OpenAI / Hugging Face chat format defines them, so each
assistant turn is supervised exactly as the template renders it: its reasoning, its tool calls and its
end-of-turn marker; tool results, prompts and the generation prompt never. The reasoning is passed under
the name the template reads (``reasoning_content``, ``thinking`` or ``reasoning``).

Templates that rewrite history (Qwen3 renders a turn's ``<think>`` block only while it is the newest turn)
are not prefix-stable; render-once would train earlier turns without the reasoning the model must produce
at that point. :func:`render_samples` therefore makes **one sample per position where the text depends on
it**: the whole conversation is rendered once and supervises every turn whose own rendering ``F`` is a
prefix of it; each remaining turn (latest first) ends a sample ``conversation[:i+1]`` of its own, which
supervises it and every other remaining turn that is stable there. A prefix-stable template (every plain
ChatML / Llama / Qwen2.5 conversation) gives exactly one sample, the same as before; the extra samples
repeat their prefix (unsupervised), and ``sft.data.prepare`` counts their tokens. ``supervise="once"``
makes one sample of the whole rendering instead and supervises each turn where and as it appears there
(Qwen3: earlier turns without their reasoning, dropped as the template drops it; no extra tokens).
``supervise="last"`` supervises only the final assistant turn (earlier turns are context, as the template
renders them).

A field the row carries that the template does not render (a ``tools`` list given to a template without
tools, reasoning given to a template without reasoning, ...) is refused: ``DataError`` naming the message
field, with ``.index`` the conversation's position in the batch. Checked by rendering the sample that
supervises the field's turn without the field: an unchanged text means the template ignores it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from sft.data.schema import (
    IGNORE_INDEX,
    REASONING,
    REASONING_ALIASES,
    ROLES,
    TEMPLATE_KWARGS,
    Conversation,
    DataError,
)

# ChatML (SmolLM2, MPT-chat, Qwen...). Turn end: "<|im_end|>".
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# OpenAssistant Guanaco style, as in timdettmers/openassistant-guanaco, plus an EOS after each reply
# so that the model learns to stop (the raw data has none). The generation prompt ends with the colon:
# the space before the reply then belongs to the reply's first token, as in training.
GUANACO = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System: ' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] }}"
    "{% else %}{{ '### Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)
TEMPLATES: dict[str, str] = {"chatml": CHATML, "guanaco": GUANACO}

_PROBE_Q, _PROBE_A = "PROBE_QUESTION_7Q", "PROBE_ANSWER_7A"
# render_samples(supervise=...): every assistant turn as the template renders it when it is the newest (one
# more sample per turn that changes later), every turn as the whole conversation renders it (one sample;
# earlier reasoning dropped as the template drops it), or only the final turn
SUPERVISE = ("all", "once", "last")


@dataclass
class Sample:
    """One rendered conversation: ``input_ids`` and ``labels`` (same length; ``IGNORE_INDEX`` = not trained)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class TemplateError(ValueError):
    """The template cannot be used for masked training (no template, not prefix-stable, or jinja refused
    or failed to render it: syntax, undefined names, sandbox violations)."""


def resolve_template(tokenizer, template: str | None) -> str:
    """Jinja source: ``None`` -> the tokenizer's own (error if it has none); a name -> ``TEMPLATES``; else jinja."""
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one is the chat template
            own = own.get("default")
        if not own:
            raise TemplateError(f"the tokenizer has no chat template; name one of {sorted(TEMPLATES)}")
        return own
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    raise TemplateError(
        f"unknown template {template!r}; expected one of {sorted(TEMPLATES)} or a jinja string"
    )


def attach_template(tokenizer, template: str | None) -> None:
    """Set ``tokenizer.chat_template`` to the training template, so ``save_pretrained`` carries it."""
    tokenizer.chat_template = resolve_template(tokenizer, template)


def _reasoning_key(tmpl: str) -> str:
    """The name under which ``tmpl`` reads an assistant's reasoning: the first alias it reads as a message
    field (``message.thinking``, ``m['reasoning']``...), else ``reasoning_content``."""
    for key in REASONING_ALIASES:
        if re.search(rf"\.{key}\b|\[\s*['\"]{key}['\"]\s*\]", tmpl):
            return key
    return REASONING


def _view(conv: Conversation, reasoning_key: str) -> tuple[list, dict]:
    """The messages as the template sees them (template kwargs taken off, reasoning under the template's
    name) and the row's template keyword arguments. A plain conversation is passed as it is."""
    kwargs: dict = {}
    msgs = []
    for m in conv:
        if isinstance(m, Mapping) and (
            TEMPLATE_KWARGS in m or (REASONING in m and reasoning_key != REASONING)
        ):
            m = dict(m)
            kwargs = m.pop(TEMPLATE_KWARGS, None) or kwargs
            if REASONING in m and reasoning_key != REASONING:
                m[reasoning_key] = m.pop(REASONING)
        msgs.append(m)
    return msgs, kwargs


def _row_error(index: int, reason: str, field: str | None = None) -> DataError:
    """A ``DataError`` about the ``index``-th conversation of a batch (the caller names file and row)."""
    e = DataError(reason, field=field)
    e.index = index
    return e


def _is_plain(conv) -> bool:
    return all(isinstance(m, Mapping) and set(m) <= {"role", "content"} for m in conv)


def _apply(tokenizer, convs: Sequence[Conversation], tmpl: str, gen: bool, *, strict: bool = True) -> list:
    """Rendered texts of ``convs``; conversations with the same template kwargs are rendered in one batch.

    A jinja failure is a ``TemplateError`` (the template itself), or, for a conversation with chat fields
    that the template refuses (Llama-3.1 takes one tool call per message), a ``DataError`` with ``.index``.
    ``strict=False``: a failing conversation gives ``None`` instead.
    """
    if not convs:
        return []
    import jinja2

    key = _reasoning_key(tmpl)
    views = [_view(c, key) for c in convs]
    groups: dict[str, list[int]] = {}
    for k, (_, kw) in enumerate(views):
        groups.setdefault(json.dumps(kw, sort_keys=True, default=str) if kw else "", []).append(k)
    out: list = [None] * len(convs)

    def run(idx):
        # transformers renders in jinja's ImmutableSandboxedEnvironment: a template cannot reach Python
        # internals ('' .__class__, list.append ...); such an attempt raises SecurityError, reported here
        return tokenizer.apply_chat_template(
            [views[k][0] for k in idx], chat_template=tmpl, tokenize=False, add_generation_prompt=gen,
            **views[idx[0]][1],
        )  # fmt: skip

    for idx in groups.values():
        try:
            texts = run(idx)
        except jinja2.TemplateError as e:
            if not strict or any(not _is_plain(convs[k]) for k in idx):
                texts = []
                for k in idx:  # which one: a template refusing a row's fields names that row
                    try:
                        texts.append(run([k])[0])
                    except jinja2.TemplateError as ek:
                        if not strict:
                            texts.append(None)
                        elif not _is_plain(convs[k]):
                            raise _row_error(
                                k, f"the chat template refused this conversation ({type(ek).__name__}: {ek})"
                            ) from None
                        else:
                            raise TemplateError(
                                f"chat template refused or failed ({type(ek).__name__}: {ek})"
                            ) from None
            else:
                raise TemplateError(f"chat template refused or failed ({type(e).__name__}: {e})") from None
        for k, t in zip(idx, texts):
            out[k] = t
    return out


def bos_to_add(tokenizer) -> int | None:
    """The BOS id the tokenizer adds by default (the model expects one), else ``None``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == bos else None


@dataclass
class Rendered:
    """One sample made by :func:`render_samples`: the ``sample``; its ``cuts`` (the token counts after each
    supervised turn, BOS included, ascending); ``conversation`` (its index in the batch); the sample renders
    ``conversation[:n_messages]`` and supervises the assistant messages ``turns``."""

    sample: Sample
    cuts: list[int]
    conversation: int
    n_messages: int
    turns: list[int]


def _plan(
    convs: Sequence[Conversation], tokenizer, tmpl: str, supervise: str, only=None
) -> list[tuple[int, int, list[int], str, list[tuple[int, int, int]], list[str], list[int]]]:
    """Which samples to make: ``(conversation, n_messages, turns, text, spans, prompts, history)`` each, in
    order; ``history``: the turns supervised as the whole conversation renders them (``supervise="once"``).

    ``spans`` are ``(start, end, turn_end)`` char spans of each supervised reply in ``text`` (``end`` excludes
    trailing whitespace after the end-of-turn marker; ``turn_end = len(F)`` is where the sample may be cut
    after that reply); ``prompts`` are the rendered prompts ``P`` of those turns. See the module docstring.
    """
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, got {supervise!r}")

    def apply(which: list[int], parts: list, gen: bool) -> list[str]:
        try:
            return _apply(tokenizer, parts, tmpl, gen=gen)
        except DataError as e:  # the index of a part -> the index of its conversation
            e.index = which[e.index]
            raise

    fulls = apply(list(range(len(convs))), list(convs), False)
    jobs = [(k, i) for k, c in enumerate(convs) for i, m in enumerate(c) if m["role"] == "assistant"]
    prompts = apply([k for k, _ in jobs], [convs[k][:i] for k, i in jobs], True)
    # the conversation closed after its last message is the full text: render only the earlier ones
    inner = [j for j, (k, i) in enumerate(jobs) if i + 1 < len(convs[k])]
    closed_inner = apply(
        [jobs[j][0] for j in inner], [convs[jobs[j][0]][: jobs[j][1] + 1] for j in inner], False
    )
    closed = [fulls[k] for k, _ in jobs]
    for j, f in zip(inner, closed_inner):
        closed[j] = f
    turns: list[list[tuple[int, str, str]]] = [[] for _ in convs]
    for (k, i), p, f in zip(jobs, prompts, closed):
        if not f.startswith(p):
            raise TemplateError(
                f"template is not prefix-stable at message {i}: rendering a prefix of the conversation does not "
                "give a prefix of the rendered text, so reply spans cannot be located"
            )
        turns[k].append((i, p, f))
    if supervise == "once":
        return _plan_once(convs, tokenizer, tmpl, fulls, turns, only, apply)
    plan = []
    for k, conv in enumerate(convs):
        remaining = turns[k]
        if supervise == "last":
            remaining = remaining[-1:]
        if only is not None:
            remaining = [t for t in remaining if t[0] in only[k]]
        pieces = []
        text, n = fulls[k], len(conv)
        while True:
            stable = [t for t in remaining if text.startswith(t[2])]
            if stable or not pieces and not remaining:
                pieces.append((n, text, stable))
            remaining = [t for t in remaining if not text.startswith(t[2])]
            if not remaining:
                break
            i, _, text = remaining[-1]  # the latest turn left ends the next sample
            n = i + 1
        for n, text, stable in reversed(pieces):
            spans = [(len(p), len(p) + len(f[len(p) :].rstrip()), len(f)) for _, p, f in stable]
            plan.append((k, n, [t[0] for t in stable], text, spans, [p for _, p, _ in stable], []))
    return plan


# what replaces a turn to find where the template put it (invisible separators: no reply starts or ends so)
_PROBE_TURN = "\u2063PROBE_TURN_7T\u2063"


def _plan_once(convs, tokenizer, tmpl, fulls, turns, only, apply):
    """``supervise="once"``: one sample per conversation, its whole rendering; a turn the template renders
    differently once later turns follow is supervised where and as it appears there (Qwen3: without its
    reasoning). Such a turn is found by rendering the conversation with that turn replaced by a probe reply:
    the texts differ exactly over the turn; its span ends after the end-of-turn marker that follows."""
    jobs = []
    for k, conv in enumerate(convs):
        for i, _, f in turns[k]:
            if not fulls[k].startswith(f) and (only is None or i in only[k]):
                probe = {"role": "assistant", "content": _PROBE_TURN}
                jobs.append((k, i, [*conv[:i], probe, *conv[i + 1 :]]))
    probed = dict(
        zip([(k, i) for k, i, _ in jobs], apply([k for k, _, _ in jobs], [c for _, _, c in jobs], False))
    )
    marker = end_of_turn_text(tokenizer, tmpl) if jobs else ""
    plan = []
    for k, conv in enumerate(convs):
        text, spans, sup, prompts, history = fulls[k], [], [], [], []
        for i, p, f in turns[k]:
            if only is not None and i not in only[k]:
                continue
            if (k, i) not in probed:
                spans.append((len(p), len(p) + len(f[len(p) :].rstrip()), len(f)))
            else:
                other = probed[(k, i)]
                a = 0
                while a < min(len(text), len(other)) and text[a] == other[a]:
                    a += 1
                b = 0
                while b < min(len(text), len(other)) - a and text[-1 - b] == other[-1 - b]:
                    b += 1
                end = len(text) - b
                if not marker or not text.startswith(marker, end) or end <= a:
                    raise TemplateError(
                        f"cannot locate message {i} in the rendered conversation (supervise='once'); "
                        "supervise='all' renders each such turn as a sample of its own"
                    )
                end += len(marker)
                turn_end = end + len(text[end:]) - len(text[end:].lstrip())
                spans.append((a, end, turn_end))
                history.append(i)
            sup.append(i)
            prompts.append(p)
        plan.append((k, len(conv), sup, text, spans, prompts, history))
    return plan


def _check_fields(convs: Sequence[Conversation], tokenizer, tmpl: str, plan) -> None:
    """Refuse a field the template does not render (module docstring): ``DataError`` with ``.index``.

    Checked, each in one sample: a supervised turn's reasoning, tool calls and the text beside its tool
    calls (in the sample that supervises it), a tool message's content (in the first sample that holds it), each template keyword
    argument (in the last sample: its text and its last turn's prompt, since ``enable_thinking`` only
    changes the generation prompt). Plain conversations cost nothing.
    """
    jobs = []  # (k, field, variant conversation, gen, original text)
    seen_tool: set[tuple[int, int]] = set()
    last_piece = {k: (n, sup, text, prompts) for k, n, sup, text, _, prompts, _ in plan}
    for k, n, sup, text, _, _, history in plan:
        conv = convs[k]
        if _is_plain(conv):
            continue
        for i in sup:
            m = conv[i]
            for key in (REASONING, "tool_calls"):
                if key in m and not (
                    key == REASONING and i in history
                ):  # "once": dropped as the template does
                    var = [*conv[:i], {a: b for a, b in m.items() if a != key}, *conv[i + 1 : n]]
                    jobs.append((k, f"messages[{i}].{key}", var, False, text))
            if "tool_calls" in m and m.get("content"):  # Llama-3.1 drops the text beside a tool call
                var = [*conv[:i], {**m, "content": ""}, *conv[i + 1 : n]]
                jobs.append((k, f"messages[{i}].content", var, False, text))
        for j in range(n):
            m = conv[j]
            if m.get("role") == "tool" and m.get("content") and (k, j) not in seen_tool:
                seen_tool.add((k, j))
                var = [*conv[:j], {**m, "content": ""}, *conv[j + 1 : n]]
                jobs.append((k, f"messages[{j}].content", var, False, text))
    for k, (n, sup, text, prompts) in last_piece.items():
        kwargs = convs[k][0].get(TEMPLATE_KWARGS) if convs[k] else None
        for name in kwargs or {}:
            first = {a: b for a, b in convs[k][0].items() if a != TEMPLATE_KWARGS}
            rest = {a: b for a, b in kwargs.items() if a != name}
            if rest:
                first[TEMPLATE_KWARGS] = rest
            var = [first, *convs[k][1:n]]
            field = "tools" if name == "tools" else f"{TEMPLATE_KWARGS}.{name}"
            jobs.append((k, field, var, False, text))
            if prompts:
                jobs.append((k, field, var[: sup[-1]], True, prompts[-1]))
    if not jobs:
        return
    unchanged: dict[tuple[int, str], bool] = {}
    for gen in (False, True):
        sel = [j for j in jobs if j[3] is gen]
        texts = _apply(tokenizer, [j[2] for j in sel], tmpl, gen=gen, strict=False)
        for (k, field, _, _, original), t in zip(sel, texts):
            unchanged[(k, field)] = unchanged.get((k, field), True) and t == original
    for (k, field), same in unchanged.items():
        if same:
            raise _row_error(
                k, "the chat template ignores this field (the rendered text is the same without it)", field
            )


def _labels_from_offsets(ids: list[int], offsets, spans) -> tuple[list[int], list[int]]:
    """Labels for ``ids`` given char ``spans``; also the token count up to each span's ``turn_end``."""
    n = len(ids)
    ends = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * n)[1::2]
    starts = np.empty_like(ends)
    if n:
        starts[0] = 0
        starts[1:] = ends[:-1]
    sup = np.zeros(n, dtype=bool)
    cuts = []
    for a, b, t in spans:
        sup |= (starts < b) & (ends > a)
        # tokens that end at or before the turn end: the sample cut after this reply
        cuts.append(int(np.searchsorted(ends, t, side="right")))
    ids_arr = np.asarray(ids, dtype=np.int64)
    labels = np.where(sup, ids_arr, IGNORE_INDEX).tolist()
    return labels, cuts


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and char offsets of ``texts`` without special tokens, from the Rust tokenizer directly
    (the transformers wrapper's per-encoding conversion costs more than the tokenization itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TemplateError("masking needs a fast tokenizer (character offsets); got a slow one")
    return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]


# With ``max_len``, a text of more than this many characters per token of ``max_len`` is tokenized by
# prefixes first (:func:`_encode_bounded`): a normal row never is (about 4 characters per token).
PROBE_CHARS_PER_TOKEN = 8
# Tokens ending within this many characters of a probe's cut are not trusted: tokenizers are local (a
# token depends on its own pre-token piece), but the piece that the cut splits may tokenize differently.
PROBE_MARGIN = 1024


def _cut_point(text: str, n: int) -> int:
    """A position at most ``n`` where ``text[:pos]`` ends before a run of white space (so the last piece
    is whole for whitespace-splitting pre-tokenizers); ``n`` when there is none in ``text[n // 2 : n]``."""
    j = max(text.rfind(" ", n // 2, n), text.rfind("\n", n // 2, n))
    if j <= 0:
        return n
    while j > n // 2 and text[j - 1].isspace():
        j -= 1
    return j


def _encode_bounded(
    tokenizer, texts: list[str], max_len: int | None
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """:func:`_encode`, except that a text that certainly has more than ``max_len`` tokens is not tokenized
    whole: only a prefix of it, enough to show that (so one 50 MB row costs what a normal row costs).

    A text of at most ``PROBE_CHARS_PER_TOKEN * max_len`` characters is tokenized whole (batched). A longer
    one is tokenized by growing prefixes (cut before white space, x4 each time): as soon as the tokens that
    end more than ``PROBE_MARGIN`` characters before a prefix's cut are more than ``max_len``, those tokens
    alone are returned (exact: the same ids and offsets as the whole text's first tokens); if no prefix
    shows it, the whole text is tokenized. ``max_len=None``: every text whole.
    """
    if max_len is None:
        return _encode(tokenizer, texts)
    limit = PROBE_CHARS_PER_TOKEN * max_len
    small = [i for i, t in enumerate(texts) if len(t) <= limit]
    out: list = [None] * len(texts)
    for i, enc in zip(small, _encode(tokenizer, [texts[i] for i in small])):
        out[i] = enc
    for i, text in enumerate(texts):
        if out[i] is not None:
            continue
        n = limit
        while n < len(text):
            cut = _cut_point(text, n)
            ids, offsets = _encode(tokenizer, [text[:cut]])[0]
            ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
            late = np.flatnonzero(ends > cut - PROBE_MARGIN)
            trusted = int(late[0]) if len(late) else len(ids)
            if trusted > max_len:
                out[i] = (list(ids[:trusted]), list(offsets[:trusted]))
                break
            n *= 4
        else:
            out[i] = _encode(tokenizer, [text])[0]
    return out


def check_messages(conv, index: int | None = None) -> None:
    """Raise ``DataError`` unless ``conv`` is a list of ``{"role": one of ROLES, "content": str}`` whose
    texts UTF-8 can encode, with chat fields that keep their rules (``sft.data.formats.check_chat_fields``):
    what the templates and the tokenizer need. (The full canonical rules, such as a final assistant turn,
    are ``sft.data.formats.validate_conversation``'s; render only needs the shape.)"""
    from sft.data.formats import check_chat_fields

    where = "" if index is None else f"conversation {index}: "
    if not isinstance(conv, list | tuple):
        raise DataError(f"{where}expected a list of messages, got {type(conv).__name__}")
    for i, m in enumerate(conv):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}expected an object, got {type(m).__name__}", field=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}role must be one of {ROLES}, got {role!r}", field=f"messages[{i}].role")
        if not isinstance(content, str):
            got = "missing" if "content" not in m else type(content).__name__
            raise DataError(f"{where}expected a string, got {got}", field=f"messages[{i}].content")
        try:
            content.encode("utf-8")
            if not set(m) <= {"role", "content"}:
                json.dumps(
                    {a: b for a, b in m.items() if a not in ("role", "content")}, ensure_ascii=False
                ).encode()
        except UnicodeEncodeError:
            raise DataError(
                f"{where}text is not valid Unicode (lone surrogate)", field=f"messages[{i}].content"
            ) from None
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}a chat field is not JSON ({e})", field=f"messages[{i}]") from None
    try:
        check_chat_fields(conv)
    except DataError as e:
        raise DataError(where + e.reason, field=e.field) from None


def render_samples(
    conversations: Sequence[Conversation],
    tokenizer,
    template: str | None = None,
    *,
    max_len: int | None = None,
    supervise: str = "all",
    only: Sequence[Sequence[int]] | None = None,
) -> list[Rendered]:
    """Conversations -> samples (batched jinja and tokenization), one or more per conversation.

    One per conversation for a prefix-stable template; a template that rewrites history gives one more
    sample per position where a turn's text depends on it (module docstring). ``supervise``: ``"all"``
    assistant turns (default) or only the ``"last"``; ``only`` (per conversation, assistant message indices)
    restricts supervision further (used to cut a sample after a turn). Raises ``DataError`` for a
    conversation that is not a list of well-formed messages (:func:`check_messages`) or carries a field the
    template ignores or refuses (with ``.index``, the conversation's position), ``TemplateError`` for a
    template that cannot be masked.

    ``max_len`` (data preparation): a sample that certainly renders to more than ``max_len`` tokens is not
    tokenized whole (:func:`_encode_bounded`). It then holds only its first tokens (more than ``max_len`` of
    them, labelled as usual) and its cut counts past those are reported as the sample's length: the caller's
    ``len(sample) > max_len`` and ``cut <= max_len`` tests give the same answers as for the whole sample, so it
    is cut or dropped exactly as before, at a fraction of the cost.
    """
    for k, conv in enumerate(conversations):
        try:
            check_messages(conv, k if len(conversations) > 1 else None)
        except DataError as e:
            e.index = k
            raise
    tmpl = resolve_template(tokenizer, template)
    if tmpl == GUANACO:  # the guanaco template renders every role it does not know as an assistant reply
        for k, conv in enumerate(conversations):
            for i, m in enumerate(conv):
                if m["role"] == "tool":
                    raise _row_error(k, "the guanaco template has no tool role", f"messages[{i}].role")
    plan = _plan(conversations, tokenizer, tmpl, supervise, only)
    if not plan:
        return []
    _check_fields(conversations, tokenizer, tmpl, plan)
    bos = bos_to_add(tokenizer)
    out = []
    for (k, n, turns, _, sp, _, _), (ids, offsets) in zip(
        plan, _encode_bounded(tokenizer, [p[3] for p in plan], max_len)
    ):
        labels, cuts = _labels_from_offsets(ids, offsets, sp)
        if bos is not None and (not ids or ids[0] != bos):
            ids, labels, cuts = [bos, *ids], [IGNORE_INDEX, *labels], [c + 1 for c in cuts]
        out.append(Rendered(Sample(list(ids), labels), cuts, k, n, turns))
    return out


def render_batch(
    conversations: Sequence[Conversation],
    tokenizer,
    template: str | None = None,
    *,
    max_len: int | None = None,
    supervise: str = "all",
) -> tuple[list[Sample], list[list[int]]]:
    """``render`` for many conversations at once (batched jinja and tokenization: fast): exactly one sample
    per conversation (:func:`render_samples` with a prefix-stable template).

    Also returns, per sample, the token counts at which it can be cut after each supervised assistant reply
    (including a prepended BOS), ascending; used to cut over-long conversations at a turn boundary.
    Raises ``DataError`` (:func:`render_samples`), and ``TemplateError`` for a template that cannot be masked
    in one sample per conversation (not prefix-stable: use :func:`render_samples`). ``max_len``: see there.
    """
    rendered = render_samples(conversations, tokenizer, template, max_len=max_len, supervise=supervise)
    for a, b in zip(rendered, rendered[1:]):
        if a.conversation == b.conversation:
            raise TemplateError(
                f"template is not prefix-stable at message {a.turns[0]}: the template renders that turn "
                "differently once later turns follow (render_samples makes one sample per such turn)"
            )
    return [r.sample for r in rendered], [r.cuts for r in rendered]


def render(
    conversation: Conversation, tokenizer, template: str | None = None, *, supervise: str = "all"
) -> Sample:
    """One conversation -> ``Sample`` (see the module docstring for the exact contract)."""
    return render_batch([conversation], tokenizer, template, supervise=supervise)[0][0]


def render_prompt(conversation: Conversation, tokenizer, template: str | None = None) -> list[int]:
    """Conversation ending in a user turn -> ids ending with the generation prompt (inference).

    Same template, same BOS rule and same tokenization as training, so the ids equal the training
    ids of that conversation up to where the reply starts.
    """
    return prompt_ids(prompt_text(conversation, tokenizer, template), tokenizer)


def prompt_text(conversation: Conversation, tokenizer, template: str | None = None) -> str:
    """The text :func:`render_prompt` tokenizes: the template's rendering of ``conversation`` with the
    generation prompt (no BOS added: :func:`prompt_ids` adds it as training does)."""
    return _apply(tokenizer, [conversation], resolve_template(tokenizer, template), gen=True)[0]


def prompt_ids(text: str, tokenizer) -> list[int]:
    """``text`` (from :func:`prompt_text`) tokenized as training tokenizes a sample: the tokenizer adds no
    special token, then BOS is prepended where the tokenizer adds one by default and the text does not
    already start with it (a template that writes BOS itself gets no second one)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_to_add(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return list(ids)


def end_of_turn_text(tokenizer, template: str | None = None) -> str:
    """The text the template puts after an assistant reply (whitespace-stripped), e.g. ``<|im_end|>``."""
    tmpl = resolve_template(tokenizer, template)
    conv = [{"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A}]
    ((_, _, _, full, spans, _, _),) = _plan([conv], tokenizer, tmpl, "all")
    start, end, _ = spans[0]
    seg = full[start:end]
    return seg[seg.rfind(_PROBE_A) + len(_PROBE_A) :].strip()


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """EOS and the template's end-of-turn token, when that marker is a single token of this tokenizer.

    A marker that this tokenizer splits into several tokens (ChatML on GPT-NeoX) has no stop id; decode
    with ``end_of_turn_text`` as a stop string then, or use a template whose turns end with EOS.
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    marker = end_of_turn_text(tokenizer, template)
    if marker:
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1 and marker_ids[0] not in ids:
            ids.append(marker_ids[0])
    return ids
