"""Tool calls, reasoning and long documents, from real rows through real templates to tokens, checked token by token.

Tool calls: Qwen2.5's own template renders them (`tools=`); the demo model's ChatML template can't, so they are
written in the built-in `<tool_call>` format. Either way calls carry loss, tool results and schemas none, and no
reply is ever empty. Reasoning: a Qwen3-like template renders it (and drops earlier turns'), others get `<think>`.
Documents longer than `max_seq_length` become blocks with no token lost; truncated chats report the answer lost.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune.cli import main
from finetune.config import RunConfig
from finetune.data import normalize_rows, read_rows
from finetune.evaluate import questions
from finetune.inference import ChatModel, describe_tool_calls, tool_calls_in
from finetune.prepare import prepare_data
from finetune.templates import (
    IGNORE_INDEX,
    encode_blocks,
    encode_example,
    labelled_turns,
    prompt_ids,
    render_preview,
    tool_call_text,
    tool_format_notice,
)
from real_models import TEMPLATES, real_tokenizer, save_tiny_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GLAIVE = FIXTURES / "datasets" / "glaive_toolcall_en_demo.json"
QWEN3_LIKE = (TEMPLATES / "qwen3-like-reasoning.jinja").read_text(encoding="utf-8")
# A ChatML reply: after the assistant header, up to and including its <|im_end|>.
CHATML_REPLY = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)

WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_ROW = {"messages": [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C"},
    {"role": "assistant", "content": "Paris 18 C, Rome 24 C.", "tool_calls": None}],
    "tools": [{"type": "function", "function": WEATHER}]}


@pytest.fixture(scope="module")
def glaive_examples():
    return normalize_rows(read_rows(GLAIVE), source=GLAIVE.name).examples


@pytest.fixture(scope="module")
def qwen():
    return real_tokenizer("qwen2")


@pytest.fixture
def demo(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


def expected_chatml_mask(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """The oracle: `text` tokenized, each token flagged when it lies inside an assistant reply (ChatML)."""
    spans = [m.span(1) for m in CHATML_REPLY.finditer(text)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]


def loss_stretches(tokenizer, enc) -> list[str]:
    """The decoded runs of consecutive loss-carrying tokens."""
    runs, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


# --- tool calls on a template that renders them (Qwen2.5) -------------------------------------------

def test_glaive_on_qwen25_calls_carry_loss_results_and_schemas_none_token_by_token(glaive_examples, qwen):
    with_calls = [ex for ex in glaive_examples if any(m.get("tool_calls") for m in ex["messages"])]
    assert len(with_calls) == 21
    for example in with_calls:
        text = qwen.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=False)
        ids, mask = expected_chatml_mask(qwen, text)
        enc = encode_example(example, qwen, max_seq_length=10**6)
        assert enc["input_ids"] == ids  # exactly the template's own render with its tools
        assert [label != IGNORE_INDEX for label in enc["labels"]] == mask  # token by token
        loss = loss_stretches(qwen, enc)
        calls = [call for m in example["messages"] for call in m.get("tool_calls") or []]
        for call in calls:  # Qwen2.5 writes each call as <tool_call> JSON; all of it carries loss
            assert any(tool_call_text(call) in stretch for stretch in loss)
        for m in example["messages"]:
            if m["role"] == "tool":
                assert f"<tool_response>\n{m['content']}\n</tool_response>" in text
                assert not any(m["content"] in stretch for stretch in loss)
        for tool in example.get("tools") or []:
            assert json.dumps(tool, ensure_ascii=False) in text and not any("<tools>" in s for s in loss)
    assert tool_format_notice(qwen, with_calls) == ("tool calls, results and schemas are rendered by the chat "
                                                    "template itself (its `tools` support)")


def test_first_glaive_call_on_qwen25_exactly(glaive_examples, qwen):
    example = next(ex for ex in glaive_examples if ex["messages"][1].get("tool_calls"))
    loss = loss_stretches(qwen, encode_example(example, qwen, max_seq_length=10**6))
    call = example["messages"][1]["tool_calls"][0]["function"]
    assert loss[0] == ('<tool_call>\n{"name": "' + call["name"] + '", "arguments": '
                       + json.dumps(call["arguments"]) + "}\n</tool_call><|im_end|>")


def test_openai_parallel_calls_on_qwen25(qwen):
    example = normalize_rows([OPENAI_ROW]).examples[0]
    enc = encode_example(example, qwen, max_seq_length=10**6)
    assert loss_stretches(qwen, enc) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Paris 18 C, Rome 24 C.<|im_end|>"]
    # the prompt for the answer after the results is what training put before it
    history = example["messages"][:-1]
    assert enc["input_ids"][:len(prompt_ids(history, qwen, example["tools"]))] == prompt_ids(history, qwen,
                                                                                             example["tools"])


# --- tool calls on a template that can't render them: the built-in format ---------------------------

def test_glaive_on_the_demo_chatml_uses_the_builtin_format_and_never_trains_an_empty_reply(glaive_examples, demo,
                                                                                          caplog):
    with caplog.at_level(logging.WARNING, logger="finetune"):
        encodings = [encode_example(ex, demo, max_seq_length=10**6) for ex in glaive_examples]
    for example, enc in zip(glaive_examples, encodings):
        loss = loss_stretches(demo, enc)
        assert all(stretch.strip() != "<|im_end|>" for stretch in loss)  # no empty reply carries loss
        replies = [m for m in example["messages"] if m["role"] == "assistant"]
        assert len(loss) == len(replies)
        for reply, stretch in zip(replies, loss):
            calls = "\n".join(tool_call_text(call) for call in reply.get("tool_calls") or [])
            assert stretch == (reply["content"] or calls) + "<|im_end|>"
        text = demo.decode(enc["input_ids"])
        for m in example["messages"]:
            if m["role"] == "tool":
                assert f"<|im_start|>user\n<tool_response>\n{m['content']}\n</tool_response><|im_end|>" in text
                assert not any(m["content"] in stretch for stretch in loss)
        if example.get("tools"):
            assert text.startswith("<|im_start|>system\n# Tools\n\n") and "<tools>" not in "".join(loss)
    notice = ("the chat template doesn't render tool calls and their results; tool calls use the built-in format "
              "instead: <tool_call> JSON at the end of the reply, results as <tool_response> blocks in a user turn, "
              "tool schemas in the system text")
    assert [r.getMessage() for r in caplog.records if r.name == "finetune.templates"] == [notice]  # once, not per row
    assert tool_format_notice(demo, glaive_examples) == notice


def test_openai_parallel_results_share_one_user_turn_in_the_builtin_format(demo):
    example = normalize_rows([{**OPENAI_ROW, "messages": [{"role": "system", "content": "Be brief."},
                                                          *OPENAI_ROW["messages"]]}]).examples[0]
    segments = render_preview(example, demo)
    text = "".join(t for t, _ in segments)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert ('<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n24 C\n</tool_response>'
            '<|im_end|>\n<|im_start|>assistant\n') in text
    assert [t for t, flag in segments if flag] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Paris 18 C, Rome 24 C.<|im_end|>"]


def test_preview_labels_tool_calls_and_results(glaive_examples):
    example = next(ex for ex in glaive_examples if ex["messages"][1].get("tool_calls"))
    lines = labelled_turns(example)
    assert lines[0] == f"turn 2 tool call (loss): {example['messages'][1]['tool_calls'][0]['function']['name']}(" \
                       f"{json.dumps(example['messages'][1]['tool_calls'][0]['function']['arguments'])})"
    assert lines[1].startswith("turn 3 tool result (no loss): ")


def test_glaive_file_previews_with_calls_and_results_labelled(capsys, demo_model_dir):
    assert main(["preview", str(GLAIVE), "--base_model", str(demo_model_dir), "-n", "40"]) == 0
    out = capsys.readouterr().out
    assert "note: the chat template doesn't render tool calls and their results; tool calls use the built-in" in out
    assert "» turn 2 tool call (loss): " in out and "» turn 3 tool result (no loss): " in out
    assert "[[<tool_call>\n{\"name\": " in out
    assert "[[<|im_end|>]]" not in out  # no empty reply with loss


def test_glaive_file_trains_on_the_demo_model(demo_model_dir):
    """What `train` feeds the trainer: every glaive row encoded, and a training step's loss on them is finite."""
    import torch
    from transformers import AutoModelForCausalLM

    config = RunConfig(base_model=str(demo_model_dir), dataset=str(GLAIVE), max_seq_length=1024, eval_fraction=0.0,
                       test_fraction=0.0)
    prepared = prepare_data(config)
    rows = prepared.dataset("train")
    assert len(rows) == 40 - prepared.examples.splits.duplicates_removed == prepared.report["train"]["chat_examples"]
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    batch = rows[:2]
    width = min(len(ids) for ids in batch["input_ids"])
    ids = torch.tensor([x[:width] for x in batch["input_ids"]])  # (2, width)
    labels = torch.tensor([x[:width] for x in batch["labels"]])
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad.abs().sum() > 0


# --- what the model emits: shown as a tool call ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("qwen"), "qwen2")


@pytest.mark.parametrize("chat_template, renders_tools", [(None, True), ("chatml", False)])
def test_eval_and_chat_prompts_of_a_tool_row_are_its_training_prompt(glaive_examples, tiny_qwen, chat_template,
                                                                     renders_tools):
    """Qwen2.5's own template (tools through `tools=`) and ChatML (the built-in format): the prompt evaluation and
    `ChatModel` build for a tool row's last reply is exactly what training put before that reply."""
    chat = ChatModel(str(tiny_qwen), chat_template=chat_template)
    tool_rows = [example for example in glaive_examples if example.get("tools")][:3]
    own = "rendered by the chat template itself"
    assert (own in tool_format_notice(chat.tokenizer, tool_rows)) is renders_tools
    for example in tool_rows:
        [question] = questions([example])
        assert question.tools == example["tools"] and question.turns == example["messages"][:-1]
        enc = encode_example(example, chat.tokenizer, max_seq_length=10**6)
        loss = [label != IGNORE_INDEX for label in enc["labels"]]
        last_reply = max(i for i in range(1, len(loss)) if loss[i] and not loss[i - 1])
        prompt = chat.prompt_ids(question.turns, tools=question.tools)
        assert prompt == enc["input_ids"][:last_reply]
        assert chat.prompt_ids(question.turns) != prompt  # without its tools the model is asked something else


def test_tool_calls_in_answers_are_read_in_each_format():
    qwen_style = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert tool_calls_in(qwen_style) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert describe_tool_calls(qwen_style) == ['tool call: get_weather({"city": "Paris"})']
    assert describe_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}') == [  # Llama 3.1
        'tool call: get_weather({"city": "Rome"})']
    assert describe_tool_calls('[{"name": "now", "arguments": {}}]') == ["tool call: now({})"]  # Mistral
    assert describe_tool_calls("<tool_call>\n{not json") == ["tool call that is not valid JSON: {not json"]
    assert describe_tool_calls("Paris is sunny.") == [] and describe_tool_calls('{"city": "Paris"}') == []


# --- reasoning ---------------------------------------------------------------------------------------------

REASONING_SHAPES = [
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two."},
    {"role": "assistant", "content": "4", "reasoning": "Two plus two."},
    {"role": "assistant", "content": "4", "thinking": "Two plus two."},
    {"role": "assistant", "content": [{"type": "reasoning", "text": "Two plus two."}, {"type": "text", "text": "4"}]},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "Two plus two."},
                                      {"type": "text", "text": "4"}]},
]


@pytest.mark.parametrize("reply", REASONING_SHAPES)
def test_reasoning_in_each_shape_is_rendered_as_think_with_loss_or_left_out(reply, demo):
    example = normalize_rows([{"messages": [{"role": "user", "content": "2+2?"}, reply]}]).examples[0]
    assert example["messages"][1] == {"role": "assistant", "content": "4", "reasoning_content": "Two plus two."}
    with_reasoning = encode_example(example, demo, max_seq_length=10**6)
    assert loss_stretches(demo, with_reasoning) == ["<think>\nTwo plus two.\n</think>\n\n4<|im_end|>"]
    without = encode_example(example, demo, max_seq_length=10**6, train_on_reasoning=False)
    assert loss_stretches(demo, without) == ["4<|im_end|>"]
    assert "Two plus two" not in demo.decode(without["input_ids"])


def test_a_template_that_renders_reasoning_gets_it_and_drops_earlier_turns_with_exact_masks(demo):
    demo.chat_template = QWEN3_LIKE
    example = {"messages": [{"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."},
                            {"role": "user", "content": "And 3+3?"},
                            {"role": "assistant", "content": "6", "reasoning_content": "Add three and three."}]}
    text = demo.apply_chat_template(example["messages"], tokenize=False)
    assert "Add two and two" not in text  # the template drops the earlier turn's reasoning
    ids, mask = expected_chatml_mask(demo, text)
    enc = encode_example(example, demo, max_seq_length=10**6)
    assert enc["input_ids"] == ids and [label != IGNORE_INDEX for label in enc["labels"]] == mask
    assert loss_stretches(demo, enc) == ["4<|im_end|>", "<think>\nAdd three and three.\n</think>\n\n6<|im_end|>"]
    without = encode_example(example, demo, max_seq_length=10**6, train_on_reasoning=False)
    assert loss_stretches(demo, without) == ["4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"]
    assert labelled_turns(example, train_on_reasoning=False)[0] == (
        "turn 2 reasoning (left out: train_on_reasoning is false): Add two and two.")


# --- documents → blocks; truncated chats -------------------------------------------------------------------

def test_a_one_megabyte_one_document_per_line_file_previews_as_hundreds_of_blocks_with_no_token_lost(
        demo_model_dir, tmp_path, capsys):
    words = ("the quick brown fox jumps over the lazy dog while rivers run to the sea and "
             "bright stars shine on quiet hills").split()
    lines = [" ".join(words[(i + k) % len(words)] for k in range(1000)) + f" document {i}." for i in range(200)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert corpus.stat().st_size > 1_000_000
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(corpus), eval_fraction=0.0, test_fraction=0.0,
                       max_seq_length=512)
    prepared = prepare_data(config)
    blocks = prepared.encoded["train"]
    tok = prepared.model.tokenizer
    total = sum(len(tok(line, add_special_tokens=False)["input_ids"]) + 1 for line in lines)  # + EOS each
    report = prepared.report["train"]
    assert report["documents"] == 200 and report["blocks"] == len(blocks) > 300
    assert report["document_tokens"] == sum(len(b["input_ids"]) for b in blocks) == total
    assert all(len(b["input_ids"]) <= 512 for b in blocks) and not any(b["truncated"] for b in blocks)
    assert sum(b["input_ids"].count(tok.eos_token_id) for b in blocks) == 200  # one EOS per document
    doc = {"text": lines[0]}
    joined = [t for b in encode_blocks(doc, tok, max_seq_length=512) for t in b["input_ids"]]
    assert joined == tok(lines[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # in order

    assert main(["preview", str(corpus), "--base_model", str(demo_model_dir), "--max_seq_length", "512",
                 "--eval_fraction", "0", "--test_fraction", "0", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "note: corpus.txt has no blank lines between its text, so each of its 200 lines is one document" in out
    assert f"  train: 200 documents → {len(blocks)} blocks of at most 512 tokens, {total:,} tokens in all (none " \
           "dropped)" in out


def test_truncated_chats_report_the_share_of_answer_tokens_lost_and_warn_above_5_percent(demo_model_dir, capsys,
                                                                                         tmp_path):
    long_answer = " ".join(f"step {i}" for i in range(60))
    rows = [{"instruction": f"Count {i}", "output": long_answer if i < 2 else "ok"} for i in range(10)]
    config = RunConfig(base_model=str(demo_model_dir), eval_fraction=0.0, test_fraction=0.0, max_seq_length=64)
    prepared = prepare_data(config, rows)
    tok = prepared.model.tokenizer
    full = [encode_example(ex, tok, max_seq_length=10**6) for ex in prepared.examples.splits.train]
    answer = sum(sum(label != IGNORE_INDEX for label in enc["labels"]) for enc in full)
    kept = sum(sum(label != IGNORE_INDEX for label in enc["labels"][:64]) for enc in full)
    report = prepared.report["train"]
    assert (report["chat_examples"], report["truncated_chat_examples"]) == (10, 2)
    assert (report["answer_tokens"], report["answer_tokens_lost"]) == (answer, answer - kept)
    assert report["answer_tokens_lost_share"] == pytest.approx((answer - kept) / answer) and 0.05 < (
        answer - kept) / answer
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    capsys.readouterr()
    assert main(["preview", "--base_model", str(demo_model_dir), "--max_seq_length", "64", "--dataset",
                 str(data), "--eval_fraction", "0", "--test_fraction", "0", "-n", "1"]) == 0
    captured = capsys.readouterr()
    share = f"{(answer - kept) / answer:.1%}"
    assert (f"warning: {share} of the train split's answer tokens ({answer - kept:,} of {answer:,}, in 2 examples) "
            "lie beyond max_seq_length = 64 and are cut off, so the model never learns them; raise `max_seq_length` "
            "or shorten those conversations") in captured.err
    assert (f"  train: {answer - kept:,} of {answer:,} answer tokens ({share}) lie beyond max_seq_length and are cut "
            "off, in 2 truncated examples") in captured.out
    assert main(["preview", "--base_model", str(demo_model_dir), "--max_seq_length", "1024", "--dataset",
                 str(data), "-n", "1"]) == 0
    assert "warning" not in capsys.readouterr().err

