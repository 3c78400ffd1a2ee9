"""Prompt formats and loss masks: a normalised example → token ids + labels, and a preview of both.

A chat example is rendered with the tokenizer's chat template (its own, or a built-in one chosen by
`apply_template_choice`). By default only the assistant replies carry loss, each together with the
end-of-turn text that follows it (`<|im_end|>`, `<|eot_id|>`, the EOS token, ...) so the model learns
to stop; system and user turns, role headers and the newlines between turns do not.

How the assistant replies are found works with any template, including real ones without
`{% generation %}` markers: for assistant turn i, the text that rendering `messages[:i+1]` adds to
rendering `messages[:i]` with a generation prompt is that reply (minus trailing whitespace). This
needs the template to be *prefix-stable* (rendering fewer messages never changes earlier text),
which we check; if it isn't, templates with `{% generation %}` markers are used through
`return_assistant_tokens_mask`; otherwise a ConfigError names the fix. Character spans become token
masks through the fast tokenizer's offsets.

Built-in templates render `<|im_start|>` / `<|im_end|>` as plain text when the tokenizer lacks those
tokens (they split into a few ordinary tokens): this keeps the vocabulary, and so the embeddings,
unchanged, which LoRA needs. Each reply then also ends with the tokenizer's own EOS token, so
generation stops on it.
"""

from __future__ import annotations

import re
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

    Tokenized exactly as `encode_example` tokenizes training text, so the prompt of a trained reply
    matches what the model saw in training.
    """
    text = _render(tokenizer, messages, add_generation_prompt=True)
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
    text = _render(tokenizer, messages, add_generation_prompt=False)
    bos = _bos_prefix(tokenizer, text)
    if train_on_prompt:
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, _all_but_pad(ids, tokenizer)
    spans = _assistant_char_spans(messages, tokenizer, text)
    if spans is not None:
        if not getattr(tokenizer, "is_fast", False):  # only Rust tokenizers report character offsets
            raise ModelError("limiting the loss to assistant replies needs a fast tokenizer (tokenizer.json); "
                             "this model only has a slow one: set `train_on_prompt: true`")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [_in_spans(start, end, spans) for start, end in enc["offset_mapping"]]
        ids = enc["input_ids"]
    elif _GENERATION_MARKER.search(_own_template(tokenizer) or ""):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
    else:
        raise ConfigError("this chat template re-renders earlier turns differently as the conversation grows "
                          "and has no `{% generation %}` markers, so the loss can't be limited to assistant "
                          "replies; use `chat_template: chatml` (or `alpaca`), or set `train_on_prompt: true`")
    return bos + list(ids), [False] * len(bos) + mask


def _all_but_pad(ids: list[int], tokenizer) -> list[bool]:
    """Loss on every token except the pad token, unless pad is EOS (EOS must carry loss)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        return [True] * len(ids)
    return [t != pad_id for t in ids]


def _assistant_char_spans(messages: list[dict], tokenizer, full_text: str) -> list[tuple[int, int]] | None:
    """Character spans [start, end) of each assistant reply in `full_text`, or None if the template
    isn't prefix-stable. A reply is what rendering it adds after the generation prompt, minus trailing
    whitespace (the newline between turns carries no loss)."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full_text.startswith(before) and full_text.startswith(upto) and len(upto) >= len(before)):
            return None
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return spans


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether a token covering characters [start, end) overlaps any span (an empty token: lies in one)."""
    if start == end:
        return any(s <= start < e for s, e in spans)
    return any(start < e and end > s for s, e in spans)


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if _own_template(tokenizer) is None:
        raise ConfigError("this tokenizer has no chat template; set `chat_template: chatml` or `alpaca` "
                          "(finetune.templates.apply_template_choice)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # Jinja raises its own errors, and templates call raise_exception() on bad input
        raise ConfigError(f"the chat template can't render this conversation ({type(e).__name__}: {e}); "
                          "use `chat_template: chatml` or `alpaca`") from None


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
