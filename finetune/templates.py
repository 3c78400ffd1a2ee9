"""Prompt formats and loss masks: a normalised example → token ids + labels, and a preview of both.

A chat example is rendered once with the tokenizer's chat template (its own, or a built-in one chosen by
`apply_template_choice`), and that render is what is trained on: the ids equal
`tokenizer.apply_chat_template(messages, tokenize=True)`, plus a BOS token where the tokenizer adds one to plain
text and the template doesn't write it. By default only the assistant replies carry loss, each together with the
end-of-turn text that follows it (`<|im_end|>`, `<|end|>`, `<end_of_turn>`, the EOS token, ...) so the model learns
to stop; the last reply also keeps what the template writes to end the conversation (Phi-3's `<|endoftext|>`).
System and user turns, role headers and the newlines between turns carry no loss.

How the replies are found:

- a template with `{% generation %}` markers marks them itself: transformers' `return_assistant_tokens_mask`;
- otherwise, in the full render: reply i starts where its generation prompt (`messages[:i]` rendered with
  `add_generation_prompt=True`) ends, which must be a prefix of the full render and tokenize to the same tokens
  (what the model is trained after is what it is prompted with); it ends after the first end-of-turn text that
  follows (the last reply: at the end of the render). The end-of-turn text is learned from the template itself,
  by rendering a probe conversation that ends after a reply and one that goes on. This also serves templates
  that render earlier turns differently as the conversation grows (Phi-3's closing EOS, Qwen3 and DeepSeek-R1
  dropping earlier turns' reasoning): the full render is what is trained on.

A conversation whose replies can't be found exactly raises a DataError saying why and what to do;
`data.normalize_rows(check_example=...)` makes it an error for that row, or a skipped row with `skip_invalid`.

System turns: a template that refuses a system turn (Gemma), drops it or moves it as the conversation grows
(Mistral v0.3 puts it into the last user turn only) gets the system text at the start of the first user turn,
followed by a blank line, in training and in prompts alike. This is detected by rendering a probe, never by model
name; `system_turn_notice` says so in one line, and it is logged once per tokenizer.

Built-in templates render `<|im_start|>` / `<|im_end|>` as plain text when the tokenizer lacks those
tokens (they split into a few ordinary tokens): this keeps the vocabulary, and so the embeddings,
unchanged, which LoRA needs. Each reply then also ends with the tokenizer's own EOS token, so
generation stops on it.
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import Any

from .errors import ConfigError, DataError, ModelError

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips
TEMPLATE_CHOICES = ("auto", "tokenizer", "chatml", "alpaca")

# ChatML as used by Qwen and SmolLM2. The reply and its `<|im_end|>` (plus EOS when EOS is a different
# token) are inside the generation markers; the newline after them is not.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- if eos_token and eos_token != '<|im_end|>' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# Stanford Alpaca's prompt. A system turn replaces the standard preamble; several turns repeat the
# Instruction/Response blocks. (Alpaca's `### Input:` block is folded into the user turn by the data
# normaliser, because chat messages have no separate input field.)
ALPACA_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '" + ALPACA_PREAMBLE + "\\n\\n' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '### Response:\\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] -}}{%- if eos_token -%}{{- eos_token -}}{%- endif -%}"
    "{%- endgeneration -%}"
    "{{- '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "alpaca": ALPACA_TEMPLATE}

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
PREVIEW_OPEN, PREVIEW_CLOSE = "[[", "]]"  # `preview_text` wraps loss-carrying text in these
# Probe conversation for learning how a template ends a turn and places a system turn.
_PROBE_USER, _PROBE_REPLY, _PROBE_NEXT = "Hello there.", "Hi! How can I help?", "Tell me a joke."
_PROBE_SYSTEM = "Answer briefly."

log = logging.getLogger(__name__)
_TEMPLATE_FACTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # see _template_facts


# --- choosing a template -------------------------------------------------------------------------

def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token (its EOS token) if it has none; batching needs one."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad token nor an EOS token; pick a base model whose "
                              "tokenizer defines an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


def apply_template_choice(tokenizer, choice: str) -> str:
    """Set `tokenizer.chat_template` for `chat_template: <choice>` and return the name used.

    `auto` keeps the tokenizer's own template if it has one, else uses `chatml`; `tokenizer` requires
    one. Returns "tokenizer", "chatml" or "alpaca". Also makes sure a pad token is set.
    """
    if choice not in TEMPLATE_CHOICES:
        raise ConfigError(f"`chat_template` must be one of {', '.join(TEMPLATE_CHOICES)} (got {choice!r})")
    own = _own_template(tokenizer)
    if choice == "tokenizer" and own is None:
        raise ConfigError("`chat_template: tokenizer` but this tokenizer has no chat template; use "
                          "`chat_template: chatml` or `alpaca`")
    if choice in ("auto", "tokenizer") and own is not None:
        tokenizer.chat_template = own
        used = "tokenizer"
    else:
        used = "chatml" if choice == "auto" else choice
        tokenizer.chat_template = BUILTIN_TEMPLATES[used]
    ensure_pad_token(tokenizer)
    return used


def _own_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is for chat
        template = template.get("default")
    return template or None


# --- encoding ------------------------------------------------------------------------------------

def encode_example(example: dict, tokenizer, *, max_seq_length: int, train_on_prompt: bool = False) -> dict:
    """Tokenize one normalised example.

    Returns `input_ids`, `labels` (IGNORE_INDEX where there is no loss), `length` (token count before
    truncation) and `truncated`. Chat examples carry loss on assistant replies only, unless
    `train_on_prompt`; text examples (`{"text": ...}`, EOS appended) on every token. Where every token
    would carry loss, the pad token does not, unless it is also the EOS token (then it marks the end
    of replies); inside assistant replies, the template's end-of-turn tokens always carry loss.
    Truncation keeps the first `max_seq_length` tokens.
    """
    ids, loss_mask = _tokens_and_loss_mask(example, tokenizer, train_on_prompt)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, loss_mask)]
    length = len(ids)
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "length": length,
            "truncated": length > max_seq_length}


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Token ids to feed `generate`: the conversation so far plus the assistant generation prompt.

    Rendered and tokenized exactly as `encode_example` does for training (system turn placed the same way), so the
    prompt of a trained reply matches what the model saw in training.
    """
    text = _render(tokenizer, place_system_turn(messages, tokenizer), add_generation_prompt=True)
    return _bos_prefix(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokens_and_loss_mask(example: dict, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    if isinstance(example.get("messages"), list):
        return _encode_chat(example["messages"], tokenizer, train_on_prompt)
    if isinstance(example.get("text"), str):
        ids = _bos_prefix(tokenizer, example["text"])
        ids += tokenizer(example["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids, _all_but_pad(ids, tokenizer)
    raise DataError(f"example has neither a `messages` list nor a `text` string (keys: {sorted(example)}); "
                    "normalise rows with finetune.data first", field="messages")


def _encode_chat(messages: list[dict], tokenizer, train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    messages = place_system_turn(messages, tokenizer)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    bos = _bos_prefix(tokenizer, text)
    if train_on_prompt:
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, _all_but_pad(ids, tokenizer)
    if not getattr(tokenizer, "is_fast", False):  # only Rust tokenizers report character offsets
        raise ModelError("limiting the loss to assistant replies needs a fast tokenizer (tokenizer.json); "
                         "this model only has a slow one: set `train_on_prompt: true`")
    if _GENERATION_MARKER.search(_own_template(tokenizer) or ""):
        ids, mask = _marked_replies(messages, tokenizer)
    else:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = _reply_spans(messages, tokenizer, text, enc)
        ids = enc["input_ids"]
        mask = [_in_spans(start, end, spans) for start, end in enc["offset_mapping"]]
    return bos + list(ids), [False] * len(bos) + mask


def _all_but_pad(ids: list[int], tokenizer) -> list[bool]:
    """Loss on every token except the pad token, unless pad is EOS (EOS must carry loss)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        return [True] * len(ids)
    return [t != pad_id for t in ids]


def _marked_replies(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """Ids and loss mask from the template's own `{% generation %}` markers (transformers), one marked stretch
    per assistant reply."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
    replies = sum(m.get("role") == "assistant" for m in messages)
    marked = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    if marked != replies:
        raise _row_error(f"the chat template's `{{% generation %}}` markers mark {marked} stretches of text but the "
                         f"conversation has {replies} assistant replies", "use `chat_template: chatml` (or `alpaca`), "
                         "or set `train_on_prompt: true`")
    return ids, mask


def _reply_spans(messages: list[dict], tokenizer, text: str, enc) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant reply with its end-of-turn text in `text`, the full render
    (tokenized as `enc`, with offsets). Raises a row's DataError when a reply can't be located exactly."""
    end_of_turn = _end_of_turn_text(tokenizer)
    spans = []
    replies = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    for number, i in enumerate(replies, 1):
        if end_of_turn and end_of_turn in (messages[i].get("content") or ""):
            raise _row_error(f"assistant reply {number} contains the chat template's end-of-turn text "
                             f"{end_of_turn!r}, so where the reply ends is ambiguous", "remove that text from the reply")
        start = _reply_start(tokenizer, messages[:i], text, enc, number)
        if i == len(messages) - 1:  # the last reply keeps what the template writes to close the conversation
            end = len(text.rstrip())
        else:
            found = text.find(end_of_turn, start) if end_of_turn else -1
            if found < 0:
                raise _row_error(f"the chat template marks no end of assistant reply {number} before the next turn, "
                                 "so the reply can't be told apart from what follows", "use `chat_template: chatml` "
                                 "(or `alpaca`), or set `train_on_prompt: true`")
            end = found + len(end_of_turn)
        if end > start:
            spans.append((start, end))
    return spans


def _reply_start(tokenizer, history: list[dict], text: str, enc, number: int) -> int:
    """Where reply `number` starts in `text`: the end of its generation prompt, which must be a prefix of `text` that
    tokenizes to the same tokens there (what the model is trained after is exactly what it is prompted with)."""
    prompt = _render(tokenizer, history, add_generation_prompt=True) if history else ""
    if not text.startswith(prompt):
        raise _row_error(f"the chat template renders the conversation before assistant reply {number} differently "
                         "once later turns follow, so the prompt for that reply isn't what the model would be "
                         "trained after", "use `chat_template: chatml` (or `alpaca`), or set `train_on_prompt: true`")
    start, offsets = len(prompt), enc["offset_mapping"]
    inside = next((k for k, (_, end) in enumerate(offsets) if end > start), len(offsets))  # first token not before
    straddles = inside < len(offsets) and offsets[inside][0] < start
    if straddles or enc["input_ids"][:inside] != tokenizer(prompt, add_special_tokens=False)["input_ids"]:
        raise _row_error(f"assistant reply {number} doesn't start at a token boundary: its prompt tokenizes "
                         "differently on its own than inside the conversation", "start the reply with a letter or "
                         "digit rather than a space or punctuation, or use `chat_template: chatml`")
    return start


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether a token covering characters [start, end) overlaps any span (an empty token: lies in one)."""
    if start == end:
        return any(s <= start < e for s, e in spans)
    return any(start < e and end > s for s, e in spans)


def _end_of_turn_text(tokenizer) -> str:
    """The text the template writes after every assistant reply ("" if none), learned once per template: what
    follows a probe reply both when the conversation ends there and when it goes on, compared token by token (so
    that Phi-3's `<|end|>` followed by `<|endoftext|>` or by `<|user|>` gives `<|end|>`), less trailing whitespace."""
    facts = _template_facts(tokenizer)
    if "end_of_turn" not in facts:
        turns = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
        try:
            ends = _after_probe_reply(_render(tokenizer, turns, add_generation_prompt=False))
            goes_on = _after_probe_reply(_render(tokenizer, [*turns, {"role": "user", "content": _PROBE_NEXT}],
                                                 add_generation_prompt=False))
        except DataError:  # the template can't render the probe: no end-of-turn text is known
            ends = goes_on = ""
        facts["end_of_turn"] = _common_token_prefix(tokenizer, ends, goes_on).rstrip()
    return facts["end_of_turn"]


def _after_probe_reply(text: str) -> str:
    at = text.find(_PROBE_REPLY)
    return text[at + len(_PROBE_REPLY):] if at >= 0 else ""


def _common_token_prefix(tokenizer, a: str, b: str) -> str:
    """The longest start of `a` made of the same tokens (ids and character offsets) as the start of `b`."""
    ta, tb = (tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in (a, b))
    same = 0
    for id_a, id_b, off_a, off_b in zip(ta["input_ids"], tb["input_ids"], ta["offset_mapping"], tb["offset_mapping"]):
        if (id_a, tuple(off_a)) != (id_b, tuple(off_b)):
            break
        same += 1
    return a[:ta["offset_mapping"][same - 1][1]] if same else ""


def _row_error(reason: str, fix: str) -> DataError:
    """A conversation this template can't encode exactly; `data.normalize_rows` names the row (or skips it)."""
    return DataError(f"{reason}; {fix}", field="messages")


# --- system turns --------------------------------------------------------------------------------

def place_system_turn(messages: list[dict], tokenizer) -> list[dict]:
    """`messages` as the template can take them: a leading system turn that the template refuses, drops or moves
    is folded into the first user turn (the system text, a blank line, the user's text); otherwise unchanged."""
    if not _starts_with_system(messages) or len(messages) < 2 or messages[1].get("role") != "user":
        return messages
    problem = _system_turn_problem(tokenizer)
    if problem is None:
        return messages
    facts = _template_facts(tokenizer)
    if not facts.get("system_notice_logged"):
        facts["system_notice_logged"] = True
        log.warning(_system_notice(problem))
    system, user = messages[0], messages[1]
    return [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *messages[2:]]


def system_turn_notice(tokenizer, examples: list[dict]) -> str | None:
    """One line for previews when any of `examples` starts with a system turn that the template can't place
    (so `place_system_turn` folds it into the first user turn); else None."""
    if not any(_starts_with_system(example.get("messages")) for example in examples):
        return None
    problem = _system_turn_problem(tokenizer)
    return _system_notice(problem) if problem else None


def _system_notice(problem: str) -> str:
    return (f"the chat template {problem}; the system text goes at the start of the first user turn instead, "
            "followed by a blank line")


def _starts_with_system(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and messages[0].get("role") == "system"


def _system_turn_problem(tokenizer) -> str | None:
    """How the template mishandles a leading system turn, found once per template by rendering a probe
    conversation with and without one; None when it places the turn at the start, to stay there."""
    facts = _template_facts(tokenizer)
    if "system_problem" not in facts:
        facts["system_problem"] = _probe_system_turn(tokenizer)
    return facts["system_problem"]


def _probe_system_turn(tokenizer) -> str | None:
    user, reply = {"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}
    later, system = {"role": "user", "content": _PROBE_NEXT}, {"role": "system", "content": _PROBE_SYSTEM}
    try:
        stable = _apply(tokenizer, [user, reply, later], add_generation_prompt=True).startswith(
            _apply(tokenizer, [user], add_generation_prompt=True))
    except Exception:  # noqa: BLE001 - fails without a system turn too: nothing to say about system turns
        return None
    try:
        first = _apply(tokenizer, [system, user], add_generation_prompt=True)
        whole = _apply(tokenizer, [system, user, reply], add_generation_prompt=False)
        longer = _apply(tokenizer, [system, user, reply, later], add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - Jinja's errors and templates' raise_exception()
        return f"refuses a system turn ({_failure(e)})"
    if stable and not longer.startswith(first):  # the system turn's doing: without one, earlier text stays put
        return "moves the system text as the conversation grows (earlier turns lose it)"
    if _PROBE_SYSTEM not in whole:
        return "drops the system text from a conversation that ends with a reply"
    return None


def _template_facts(tokenizer) -> dict:
    """What the probes found for this tokenizer's current template and special tokens (a dict filled lazily, kept
    while the tokenizer lives)."""
    key = (_own_template(tokenizer) or "", tokenizer.bos_token, tokenizer.eos_token)
    return _TEMPLATE_FACTS.setdefault(tokenizer, {}).setdefault(key, {})


# --- rendering -----------------------------------------------------------------------------------

def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if _own_template(tokenizer) is None:
        raise ConfigError("this tokenizer has no chat template; set `chat_template: chatml` or `alpaca` "
                          "(finetune.templates.apply_template_choice)")
    try:
        return _apply(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - Jinja raises its own errors, and templates call raise_exception()
        raise _row_error(f"the chat template can't render this conversation ({_failure(e)})",
                         "use `chat_template: chatml` or `alpaca`") from None


def _apply(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _bos_prefix(tokenizer, text: str) -> list[int]:
    """[bos_id] if the tokenizer adds a BOS token to plain text and `text` doesn't start with one.

    We tokenize rendered chats with add_special_tokens=False because templates such as Llama 3's
    write the BOS token themselves; this adds it for the templates that don't, and never twice.
    """
    bos_id, bos = tokenizer.bos_token_id, tokenizer.bos_token
    if bos_id is None or not bos or text.startswith(bos):
        return []
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = with_specials[:1] == [bos_id] and without[:1] != [bos_id]
    return [bos_id] if adds_bos else []


# --- preview -------------------------------------------------------------------------------------

def render_preview(example: dict, tokenizer, *, max_seq_length: int | None = None,
                   train_on_prompt: bool = False) -> list[tuple[str, bool]]:
    """The encoded example as consecutive `(text, carries_loss)` segments, adjacent flags merged.

    The texts joined equal `tokenizer.decode(input_ids)` exactly. Where one character is split over
    tokens with different flags (rare, byte-level BPE), it goes to the segment of its first token.
    """
    enc = encode_example(example, tokenizer, max_seq_length=max_seq_length or 2**62,
                         train_on_prompt=train_on_prompt)
    ids = enc["input_ids"]
    flags = [label != IGNORE_INDEX for label in enc["labels"]]
    full = tokenizer.decode(ids)
    segments: list[tuple[str, bool]] = []
    cut = 0  # characters of `full` already assigned to segments
    start = 0  # first token not yet assigned
    while start < len(ids):
        end = start
        while end < len(ids) and flags[end] == flags[start]:
            end += 1
        end, text_end = _text_boundary(tokenizer, ids, full, end, cut)
        _append_merged(segments, full[cut:text_end], flags[start])
        cut, start = text_end, end
    return segments


def _text_boundary(tokenizer, ids: list[int], full: str, end: int, cut: int) -> tuple[int, int]:
    """First token index >= `end` where the decoded prefix is a prefix of `full` (at least `cut` long),
    and that prefix's length in characters."""
    while end < len(ids):
        head = tokenizer.decode(ids[:end])
        if len(head) >= cut and full.startswith(head):
            return end, len(head)
        end += 1
    return len(ids), len(full)


def _append_merged(segments: list[tuple[str, bool]], text: str, flag: bool) -> None:
    if not text:
        return
    if segments and segments[-1][1] == flag:
        segments[-1] = (segments[-1][0] + text, flag)
    else:
        segments.append((text, flag))


def preview_text(segments: list[tuple[str, bool]]) -> str:
    """Plain-text preview for terminals: loss-carrying text is wrapped in `[[` and `]]`."""
    return "".join(f"{PREVIEW_OPEN}{text}{PREVIEW_CLOSE}" if flag else text for text, flag in segments)


def loss_token_count(encoded: dict[str, Any]) -> int:
    """Number of tokens that carry loss in an `encode_example` result."""
    return sum(label != IGNORE_INDEX for label in encoded["labels"])
