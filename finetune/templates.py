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
`prepare.prepare_data` makes it an error for that row, or a skipped row with `skip_invalid`.

System turns: a template that refuses a system turn (Gemma), drops it or moves it as the conversation grows
(Mistral v0.3 puts it into the last user turn only) gets the system text at the start of the first user turn,
followed by a blank line, in training and in prompts alike. This is detected by rendering a probe, never by model
name; `system_turn_notice` says so in one line, and it is logged once per tokenizer.

Tool calls (see `data` for the one shape every input becomes): a template that renders them, their results and the
tool schemas itself (Qwen2.5, Llama 3.1: found by rendering a probe conversation, never by model name) gets them
through `apply_chat_template(tools=...)`; any other template gets the built-in format, written into the messages
before templating (Hermes/Qwen2.5 style): each call as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
at the end of the assistant's reply, the results of one round as a user turn of `<tool_response>\n...\n</tool_response>`
blocks, and the schemas in the system text (`TOOLS_SYSTEM_TEXT`). `tool_format_notice` says which in one line. Either
way calls carry loss like any reply text, and results and schemas carry none.

Reasoning (`reasoning_content` on an assistant turn) goes through templates that render it (Qwen3-style); others get
it at the start of the reply as `<think>\n...\n</think>\n\n`. It carries loss like the reply, or, with
`train_on_reasoning=False`, is left out of the example altogether. A template that drops earlier turns' reasoning
(Qwen3) trains on what it renders: the reasoning of the replies after the last user turn.

Documents (`{"text": ...}`) longer than `max_seq_length` become consecutive blocks (`encode_blocks`), none dropped;
`encoding_report` counts documents, blocks and tokens, and the share of answer tokens truncation cuts from chats.

Built-in templates render `<|im_start|>` / `<|im_end|>` as plain text when the tokenizer lacks those
tokens (they split into a few ordinary tokens): this keeps the vocabulary, and so the embeddings,
unchanged, which LoRA needs. Each reply then also ends with the tokenizer's own EOS token, so
generation stops on it.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections.abc import Iterable
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
_PROBE_TOOL, _PROBE_ARGUMENT, _PROBE_RESULT = "probe_lookup", "probe-argument", "probe-result-17"
_PROBE_TOOL_DESCRIPTION, _PROBE_REASONING = "Looks up a probe value.", "Probe reasoning goes here."

# The built-in tool format (Hermes / Qwen2.5 style), for templates that can't render tools themselves.
TOOLS_SYSTEM_TEXT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"  # built-in reasoning: before the reply's text

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

def encode_example(example: dict, tokenizer, *, max_seq_length: int, train_on_prompt: bool = False,
                   train_on_reasoning: bool = True) -> dict:
    """Tokenize one normalised example.

    Returns `input_ids`, `labels` (IGNORE_INDEX where there is no loss), `length` (token count before
    truncation), `truncated` and `loss_tokens` (tokens carrying loss before truncation). Chat examples carry loss
    on assistant replies only (tool calls and reasoning included; reasoning is left out with
    `train_on_reasoning=False`), unless `train_on_prompt`; text examples (`{"text": ...}`, EOS appended) on every
    token. Where every token would carry loss, the pad token does not, unless it is also the EOS token (then it
    marks the end of replies); inside assistant replies, the template's end-of-turn tokens always carry loss.
    Truncation keeps the first `max_seq_length` tokens.
    """
    ids, loss_mask = _tokens_and_loss_mask(example, tokenizer, train_on_prompt, train_on_reasoning)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, loss_mask)]
    length = len(ids)
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "length": length,
            "truncated": length > max_seq_length, "loss_tokens": sum(loss_mask)}


def encode_blocks(example: dict, tokenizer, *, max_seq_length: int, train_on_prompt: bool = False,
                  train_on_reasoning: bool = True) -> list[dict]:
    """`encode_example` as a list: one encoding for a chat example (truncated as there), and for a document
    (`{"text": ...}`, EOS appended) consecutive blocks of at most `max_seq_length` tokens, so no token is dropped.
    A block's `length` is its own token count, and `block` its index in the document."""
    settings = dict(train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
    if not isinstance(example.get("text"), str):
        return [encode_example(example, tokenizer, max_seq_length=max_seq_length, **settings)]
    whole = encode_example(example, tokenizer, max_seq_length=2**62, **settings)
    blocks = []
    for number, at in enumerate(range(0, max(whole["length"], 1), max_seq_length)):
        ids, labels = whole["input_ids"][at:at + max_seq_length], whole["labels"][at:at + max_seq_length]
        blocks.append({"input_ids": ids, "labels": labels, "length": len(ids), "truncated": False,
                       "loss_tokens": sum(label != IGNORE_INDEX for label in labels), "block": number})
    return blocks


def encoding_report(encodings: list[dict]) -> dict:
    """What encoding did to a split: documents, the blocks they became and their tokens; chat examples, their answer
    tokens (loss tokens before truncation) and how many of those truncation cut off. An encoding may give
    `loss_kept` (its labels' loss tokens, counted) instead of its labels: `prepare` reports from stored columns."""
    blocks = [enc for enc in encodings if "block" in enc]
    chats = [enc for enc in encodings if "block" not in enc]
    answer = sum(enc["loss_tokens"] for enc in chats)
    lost = answer - sum(enc["loss_kept"] if "loss_kept" in enc else loss_token_count(enc) for enc in chats)
    return _with_share({"documents": sum(enc["block"] == 0 for enc in blocks), "blocks": len(blocks),
                        "document_tokens": sum(enc["length"] for enc in blocks), "chat_examples": len(chats),
                        "truncated_chat_examples": sum(enc["truncated"] for enc in chats), "answer_tokens": answer,
                        "answer_tokens_lost": lost})


def combined_report(reports: Iterable[dict]) -> dict:
    """One `encoding_report` of encodings reported in parts (a large split is reported a batch at a time)."""
    counts: dict[str, int] = {}
    for report in reports:
        for name, value in report.items():
            if name != "answer_tokens_lost_share":
                counts[name] = counts.get(name, 0) + value
    return _with_share(counts) if counts else encoding_report([])


def _with_share(counts: dict) -> dict:
    answer, lost = counts["answer_tokens"], counts["answer_tokens_lost"]
    return {**counts, "answer_tokens_lost_share": lost / answer if answer else 0.0}


LOST_ANSWER_WARNING_SHARE = 0.05  # above this share of answer tokens cut by truncation, say so loudly


def truncation_warning(report: dict, max_seq_length: int, split: str = "train") -> str | None:
    """A warning line when truncation cuts more than 5% of a split's answer tokens; else None."""
    share = report["answer_tokens_lost_share"]
    if share <= LOST_ANSWER_WARNING_SHARE:
        return None
    return (f"{share:.1%} of the {split} split's answer tokens ({report['answer_tokens_lost']:,} of "
            f"{report['answer_tokens']:,}, in {report['truncated_chat_examples']:,} examples) lie beyond "
            f"max_seq_length = {max_seq_length} and are cut off, so the model never learns them; raise "
            "`max_seq_length` or shorten those conversations")


def encoding_report_lines(report: dict[str, dict], max_seq_length: int) -> list[str]:
    """`encoding_report` per split for people (the CLI preview and the app's Data tab print these): documents, their
    blocks and tokens; answer tokens cut off, for a split where truncation cuts any."""
    lines = []
    for split, r in report.items():
        if r["documents"]:
            lines.append(f"{split}: {_counted(r['documents'], 'document')} → {_counted(r['blocks'], 'block')} of at "
                         f"most {max_seq_length} tokens, {_counted(r['document_tokens'], 'token')} in all (none "
                         "dropped)")
        if r["truncated_chat_examples"]:
            lines.append(f"{split}: {r['answer_tokens_lost']:,} of {_counted(r['answer_tokens'], 'answer token')} "
                         f"({r['answer_tokens_lost_share']:.1%}) lie beyond max_seq_length and are cut off, in "
                         f"{_counted(r['truncated_chat_examples'], 'truncated example')}")
    return lines


def _counted(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def prompt_ids(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> list[int]:
    """Token ids to feed `generate`: the conversation so far plus the assistant generation prompt.

    Rendered and tokenized exactly as `encode_example` does for training (system turn, tools and reasoning placed
    the same way), so the prompt of a trained reply matches what the model saw in training.
    """
    messages, tools = template_messages(messages, tools, tokenizer)
    text = _render(tokenizer, messages, tools=tools, add_generation_prompt=True)
    return _bos_prefix(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokens_and_loss_mask(example: dict, tokenizer, train_on_prompt: bool,
                          train_on_reasoning: bool) -> tuple[list[int], list[bool]]:
    if isinstance(example.get("messages"), list):
        messages, tools = template_messages(example["messages"], example.get("tools"), tokenizer,
                                            train_on_reasoning=train_on_reasoning)
        return _encode_chat(messages, tools, tokenizer, train_on_prompt)
    if isinstance(example.get("text"), str):
        ids = _bos_prefix(tokenizer, example["text"])
        ids += tokenizer(example["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids, _all_but_pad(ids, tokenizer)
    raise DataError(f"example has neither a `messages` list nor a `text` string (keys: {sorted(example)}); "
                    "normalise rows with finetune.data first", field="messages")


def _encode_chat(messages: list[dict], tools: list[dict] | None, tokenizer,
                 train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    text = _render(tokenizer, messages, tools=tools, add_generation_prompt=False)
    bos = _bos_prefix(tokenizer, text)
    if train_on_prompt:
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, _all_but_pad(ids, tokenizer)
    if not getattr(tokenizer, "is_fast", False):  # only Rust tokenizers report character offsets
        raise ModelError("limiting the loss to assistant replies needs a fast tokenizer (tokenizer.json); "
                         "this model only has a slow one: set `train_on_prompt: true`")
    if _GENERATION_MARKER.search(_own_template(tokenizer) or ""):
        ids, mask = _marked_replies(messages, tools, tokenizer)
    else:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = _reply_spans(messages, tools, tokenizer, text, enc)
        ids = enc["input_ids"]
        mask = [_in_spans(start, end, spans) for start, end in enc["offset_mapping"]]
    return bos + list(ids), [False] * len(bos) + mask


def _all_but_pad(ids: list[int], tokenizer) -> list[bool]:
    """Loss on every token except the pad token, unless pad is EOS (EOS must carry loss)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        return [True] * len(ids)
    return [t != pad_id for t in ids]


def _marked_replies(messages: list[dict], tools: list[dict] | None, tokenizer) -> tuple[list[int], list[bool]]:
    """Ids and loss mask from the template's own `{% generation %}` markers (transformers), one marked stretch
    per assistant reply."""
    enc = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
    replies = sum(m.get("role") == "assistant" for m in messages)
    marked = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    if marked != replies:
        raise _row_error(f"the chat template's `{{% generation %}}` markers mark {marked} stretches of text but the "
                         f"conversation has {replies} assistant replies", "use `chat_template: chatml` (or `alpaca`), "
                         "or set `train_on_prompt: true`")
    return ids, mask


def _reply_spans(messages: list[dict], tools: list[dict] | None, tokenizer, text: str,
                 enc) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant reply with its end-of-turn text in `text`, the full render
    (tokenized as `enc`, with offsets). Raises a row's DataError when a reply can't be located exactly, or when a
    tool call the reply makes isn't in it (a template that drops calls must never train an empty reply)."""
    end_of_turn = _end_of_turn_text(tokenizer)
    spans = []
    replies = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    for number, i in enumerate(replies, 1):
        if end_of_turn and end_of_turn in (messages[i].get("content") or ""):
            raise _row_error(f"assistant reply {number} contains the chat template's end-of-turn text "
                             f"{end_of_turn!r}, so where the reply ends is ambiguous",
                             "remove that text from the reply")
        start = _reply_start(tokenizer, messages[:i], tools, text, enc, number)
        if i == len(messages) - 1:  # the last reply keeps what the template writes to close the conversation
            end = len(text.rstrip())
        else:
            found = text.find(end_of_turn, start) if end_of_turn else -1
            if found < 0:
                raise _row_error(f"the chat template marks no end of assistant reply {number} before the next turn, "
                                 "so the reply can't be told apart from what follows", "use `chat_template: chatml` "
                                 "(or `alpaca`), or set `train_on_prompt: true`")
            end = found + len(end_of_turn)
        missing = [call["function"]["name"] for call in messages[i].get("tool_calls") or []
                   if call["function"]["name"] not in text[start:end]]
        if missing:
            raise _row_error(f"the chat template drops the tool call `{missing[0]}` from assistant reply {number}",
                             "use `chat_template: chatml`, which writes tool calls in the built-in format")
        if end > start:
            spans.append((start, end))
    return spans


def _reply_start(tokenizer, history: list[dict], tools: list[dict] | None, text: str, enc, number: int) -> int:
    """Where reply `number` starts in `text`: the end of its generation prompt, which must be a prefix of `text` that
    tokenizes to the same tokens there (what the model is trained after is exactly what it is prompted with)."""
    prompt = _render(tokenizer, history, tools=tools, add_generation_prompt=True) if history else ""
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
    """A conversation this template can't encode exactly; `prepare.prepare_data` names the row (or skips it)."""
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


# --- tools and reasoning -------------------------------------------------------------------------

def template_messages(messages: list[dict], tools: list[dict] | None, tokenizer, *,
                      train_on_reasoning: bool = True) -> tuple[list[dict], list[dict] | None]:
    """`messages` and `tools` as this template takes them: reasoning rendered by the template or as `<think>` text
    (or left out), tool calls through the template's own `tools=` support or the built-in format (then the tools
    returned are None: they are in the system text), and the system turn placed (`place_system_turn`)."""
    messages = [_with_reasoning(message, tokenizer, train_on_reasoning) for message in messages]
    if _uses_tools(messages, tools):
        problem = _tool_problem(tokenizer)
        if problem is not None:
            facts = _template_facts(tokenizer)
            if not facts.get("tool_notice_logged"):
                facts["tool_notice_logged"] = True
                log.warning(_builtin_tool_notice(problem))
            messages, tools = builtin_tool_messages(messages, tools), None
    return place_system_turn(messages, tokenizer), tools


def builtin_tool_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation in the built-in tool format, as plain system/user/assistant turns: each assistant turn's
    calls as `<tool_call>` JSON after its text, each round of results as one user turn of `<tool_response>` blocks,
    and the tool schemas (`TOOLS_SYSTEM_TEXT`) after the system text (a system turn of their own if there is none)."""
    out: list[dict] = []
    previous_role = None
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous_role == "tool":  # results of one round share a user turn
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{block}"}
            else:
                out.append({"role": "user", "content": block})
        elif message.get("tool_calls"):
            calls = "\n".join(tool_call_text(call) for call in message["tool_calls"])
            text = message.get("content") or ""
            reply = {key: value for key, value in message.items() if key != "tool_calls"}
            out.append({**reply, "content": f"{text}\n{calls}" if text else calls})
        else:
            out.append(message)
        previous_role = role
    if tools:
        schemas = TOOLS_SYSTEM_TEXT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{schemas}"}
        else:
            out.insert(0, {"role": "system", "content": schemas})
    return out


def tool_call_text(call: dict) -> str:
    """One call in the built-in format: `<tool_call>`, the JSON {"name", "arguments"}, `</tool_call>` on 3 lines."""
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def tool_format_notice(tokenizer, examples: list[dict]) -> str | None:
    """One line for previews when any of `examples` uses tools: whether the template renders them or the built-in
    format is used (and why); None when no example uses tools."""
    if not any(_uses_tools(example.get("messages") or [], example.get("tools")) for example in examples):
        return None
    problem = _tool_problem(tokenizer)
    if problem is None:
        return "tool calls, results and schemas are rendered by the chat template itself (its `tools` support)"
    return _builtin_tool_notice(problem)


def _builtin_tool_notice(problem: str) -> str:
    return (f"the chat template {problem}; tool calls use the built-in format instead: <tool_call> JSON at the end "
            "of the reply, results as <tool_response> blocks in a user turn, tool schemas in the system text")


def _uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def _tool_problem(tokenizer) -> str | None:
    """Why the template can't take tool calls through `tools=` (found once per template by rendering a probe
    conversation with a call, its result and a schema), or None when it renders all three, in order, and keeps the
    start of the conversation in place as it grows."""
    facts = _template_facts(tokenizer)
    if "tool_problem" not in facts:
        facts["tool_problem"] = _probe_tools(tokenizer)
    return facts["tool_problem"]


def _probe_tools(tokenizer) -> str | None:
    schema = {"type": "function", "function": {
        "name": _PROBE_TOOL, "description": _PROBE_TOOL_DESCRIPTION,
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": _PROBE_TOOL, "arguments": {"query": _PROBE_ARGUMENT}}}]}
    user, later = {"role": "user", "content": _PROBE_USER}, {"role": "user", "content": _PROBE_NEXT}
    result, reply = {"role": "tool", "content": _PROBE_RESULT}, {"role": "assistant", "content": _PROBE_REPLY}
    try:
        first = _apply(tokenizer, [user], tools=[schema], add_generation_prompt=True)
        whole = _apply(tokenizer, [user, call, result, reply, later], tools=[schema], add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - Jinja's errors and templates' raise_exception()
        return f"fails on tool calls ({_failure(e)})"
    at = [whole.find(text) for text in (_PROBE_USER, _PROBE_ARGUMENT, _PROBE_RESULT, _PROBE_REPLY)]
    if -1 in at or at != sorted(at):
        return "doesn't render tool calls and their results"
    if _PROBE_TOOL_DESCRIPTION not in whole:
        return "doesn't render tool schemas"
    if not whole.startswith(first):
        return "moves the tool schemas as the conversation grows"
    return None


def _with_reasoning(message: dict, tokenizer, train_on_reasoning: bool) -> dict:
    """An assistant turn's `reasoning_content` left to a template that renders it, else written before the reply's
    text as `<think>...</think>`; removed with `train_on_reasoning=False`."""
    reasoning = message.get("reasoning_content")
    if message.get("role") != "assistant" or reasoning is None:
        return message
    rest = {key: value for key, value in message.items() if key != "reasoning_content"}
    if not train_on_reasoning:
        return rest
    if _renders_reasoning(tokenizer):
        return message
    return {**rest, "content": f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{message.get('content') or ''}"}


def _renders_reasoning(tokenizer) -> bool:
    """Whether the template writes an assistant turn's `reasoning_content` (Qwen3-style), found once by a probe."""
    facts = _template_facts(tokenizer)
    if "reasoning" not in facts:
        turns = [{"role": "user", "content": _PROBE_USER},
                 {"role": "assistant", "content": _PROBE_REPLY, "reasoning_content": _PROBE_REASONING}]
        try:
            facts["reasoning"] = _PROBE_REASONING in _apply(tokenizer, turns, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template that fails on the probe doesn't render reasoning
            facts["reasoning"] = False
    return facts["reasoning"]


def _template_facts(tokenizer) -> dict:
    """What the probes found for this tokenizer's current template and special tokens (a dict filled lazily, kept
    while the tokenizer lives)."""
    key = (_own_template(tokenizer) or "", tokenizer.bos_token, tokenizer.eos_token)
    return _TEMPLATE_FACTS.setdefault(tokenizer, {}).setdefault(key, {})


# --- rendering -----------------------------------------------------------------------------------

def _render(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool) -> str:
    if _own_template(tokenizer) is None:
        raise ConfigError("this tokenizer has no chat template; set `chat_template: chatml` or `alpaca` "
                          "(finetune.templates.apply_template_choice)")
    try:
        return _apply(tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - Jinja raises its own errors, and templates call raise_exception()
        raise _row_error(f"the chat template can't render this conversation ({_failure(e)})",
                         "use `chat_template: chatml` or `alpaca`") from None


def _apply(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


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

def render_preview(example: dict, tokenizer, *, max_seq_length: int | None = None, train_on_prompt: bool = False,
                   train_on_reasoning: bool = True) -> list[tuple[str, bool]]:
    """The encoded example as consecutive `(text, carries_loss)` segments, adjacent flags merged.

    The texts joined equal `tokenizer.decode(input_ids)` exactly. Where one character is split over
    tokens with different flags (rare, byte-level BPE), it goes to the segment of its first token.
    """
    enc = encode_example(example, tokenizer, max_seq_length=max_seq_length or 2**62,
                         train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
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


def labelled_turns(example: dict, *, train_on_reasoning: bool = True) -> list[str]:
    """One line per tool call, tool result and reasoning of a chat example, for previews: which parts of the
    rendered text are calls (loss), results (no loss) and reasoning (loss, or left out)."""
    lines = []
    for number, message in enumerate(example.get("messages") or [], 1):
        if message.get("reasoning_content"):
            what = "reasoning (loss)" if train_on_reasoning else "reasoning (left out: train_on_reasoning is false)"
            lines.append(f"turn {number} {what}: {_shortened(message['reasoning_content'])}")
        for call in message.get("tool_calls") or []:
            arguments = json.dumps(call["function"]["arguments"], ensure_ascii=False)
            lines.append(f"turn {number} tool call (loss): {call['function']['name']}({_shortened(arguments)})")
        if message.get("role") == "tool":
            lines.append(f"turn {number} tool result (no loss): {_shortened(message['content'])}")
    return lines


def _shortened(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def preview_text(segments: list[tuple[str, bool]]) -> str:
    """Plain-text preview for terminals: loss-carrying text is wrapped in `[[` and `]]`."""
    return "".join(f"{PREVIEW_OPEN}{text}{PREVIEW_CLOSE}" if flag else text for text, flag in segments)


def loss_token_count(encoded: dict[str, Any]) -> int:
    """Number of tokens that carry loss in an `encode_example` result."""
    return sum(label != IGNORE_INDEX for label in encoded["labels"])
