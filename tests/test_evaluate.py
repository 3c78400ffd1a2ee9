"""Evaluation: score functions on known values, token-weighted loss, and the eval/ files of a run."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import DataError
from finetune.evaluate import (
    ANSWER_COLUMNS,
    evaluate_run,
    exact_match,
    lcs_length,
    normalize_answer,
    prompt_and_reference,
    rouge_l,
    split_loss,
    token_f1,
)
from finetune.inference import ChatModel
from finetune.templates import encode_example

MAX_NEW_TOKENS = 8


# ----------------------------------------------------------------------------- pure scores
def test_normalize_answer():
    assert normalize_answer("  Hello,   World!\n") == "hello world"
    assert normalize_answer("¿Qué tal?") == "qué tal"  # Unicode punctuation too
    assert normalize_answer("state-of-the-art") == "stateoftheart"  # removed, as in SQuAD


def test_exact_match():
    assert exact_match("Paris.", "  paris") == 1.0
    assert exact_match("Paris", "Lyon") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_known_values():
    assert token_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # P=1, R=1/2
    assert token_f1("the the the", "the cat") == pytest.approx(0.4)  # overlap counts "the" once: P=1/3, R=1/2
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0 and token_f1("cat", "") == 0.0


def test_rouge_l_known_values():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example
    # LCS "the cat sat" = 3 tokens: P = 3/6, R = 3/5, F = 2PR/(P+R) = 6/11
    assert rouge_l("the cat sat on the mat", "the mat the cat sat") == pytest.approx(6 / 11)
    # Same bag of words scores higher with token F1 (order is ignored): 5 shared → P=5/6, R=1, F=10/11
    assert token_f1("the cat sat on the mat", "the mat the cat sat") == pytest.approx(10 / 11)
    assert rouge_l("Paris!", "paris") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def test_prompt_and_reference_splits_at_the_last_assistant_turn():
    example = {"messages": [{"role": "user", "content": "Count to three."},
                            {"role": "assistant", "content": "One, two, three."},
                            {"role": "user", "content": "And back?"},
                            {"role": "assistant", "content": "Three, two, one."}]}
    turns, reference = prompt_and_reference(example)
    assert reference == "Three, two, one."
    assert [t["content"] for t in turns] == ["Count to three.", "One, two, three.", "And back?"]
    assert prompt_and_reference({"text": "plain text"}) is None


# ----------------------------------------------------------------------------- loss
@pytest.fixture(scope="module")
def base_and_tokenizer(demo_model_dir, lora_run_dir):
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(lora_run_dir / "adapter"))


def test_split_loss_of_one_example_is_the_models_own_loss(base_and_tokenizer, chat_examples):
    model, tokenizer = base_and_tokenizer
    enc = encode_example(chat_examples[0], tokenizer, max_seq_length=256)
    with torch.inference_mode():
        hf_loss = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss
    assert split_loss(model, tokenizer, chat_examples[:1], max_seq_length=256) == pytest.approx(float(hf_loss),
                                                                                                 abs=1e-5)


def test_split_loss_weights_every_token_equally(base_and_tokenizer, chat_examples):
    model, tokenizer = base_and_tokenizer
    per_example = []
    for ex in chat_examples:
        tokens = sum(label != -100 for label in encode_example(ex, tokenizer, max_seq_length=256)["labels"][1:])
        per_example.append((split_loss(model, tokenizer, [ex], max_seq_length=256), tokens))
    weighted = sum(loss * n for loss, n in per_example) / sum(n for _, n in per_example)
    assert len({n for _, n in per_example}) > 1  # different lengths, so weighting matters
    batched = split_loss(model, tokenizer, chat_examples, max_seq_length=256, batch_size=2)  # padding inside
    assert batched == pytest.approx(weighted, abs=1e-5)


def test_split_loss_without_answer_tokens_is_explained(base_and_tokenizer, chat_examples):
    model, tokenizer = base_and_tokenizer
    with pytest.raises(DataError) as err:
        split_loss(model, tokenizer, chat_examples[:1], max_seq_length=4)
    assert str(err.value) == ("none of the 1 examples has an answer token within `max_seq_length` (4); raise "
                              "`max_seq_length` or shorten the prompts")


# ----------------------------------------------------------------------------- evaluate_run
@pytest.fixture(scope="module")
def evaluated(lora_run_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(lora_run_dir, run)
    calls: list[tuple[float, str]] = []
    chat = ChatModel.from_run(run)
    summary = evaluate_run(run, max_new_tokens=MAX_NEW_TOKENS, progress=lambda f, m: calls.append((f, m)),
                           chat=chat)
    return run, summary, calls, chat


def test_answer_files_have_one_row_per_example_and_the_columns(evaluated, chat_examples):
    run, summary, _, _ = evaluated
    rows = [json.loads(line) for line in (run / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(chat_examples) == summary["answered"] == summary["examples"]
    assert all(list(row) == list(ANSWER_COLUMNS) for row in rows)
    with (run / "eval" / "answers.csv").open(newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == list(ANSWER_COLUMNS)
    assert len(table) == 1 + len(chat_examples)
    assert [r[:2] for r in table[1:]] == [
        ["What is the capital of France?", "Paris."],
        ["system: Answer briefly.\nuser: Name a primary colour.", "Blue."],
        ["user: Count to three.\nassistant: One, two, three.\nuser: And back?", "Three, two, one."],
    ]
    assert table[1][2] == rows[0]["base_answer"] and float(table[1][6]) == rows[0]["finetuned_exact_match"]


def test_answers_are_both_models_greedy_answers_with_their_scores(evaluated, chat_examples):
    run, summary, _, chat = evaluated
    rows = [json.loads(line) for line in (run / "eval" / "answers.jsonl").read_text().splitlines()]
    turns, reference = prompt_and_reference(chat_examples[0])
    greedy = dict(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    assert rows[0]["base_answer"] == chat.generate(turns, adapter=False, **greedy)
    assert rows[0]["finetuned_answer"] == chat.generate(turns, adapter=True, **greedy)
    assert rows[0]["base_answer"] != rows[0]["finetuned_answer"]
    for row in rows:
        for side in ("base", "finetuned"):
            answer = row[f"{side}_answer"]
            assert row[f"{side}_token_f1"] == token_f1(answer, row["reference"])
            assert row[f"{side}_rouge_l"] == rouge_l(answer, row["reference"])
            assert row[f"{side}_exact_match"] == exact_match(answer, row["reference"])
    assert summary["finetuned_rouge_l"] == pytest.approx(sum(r["finetuned_rouge_l"] for r in rows) / len(rows))


def test_losses_of_base_and_fine_tuned(evaluated, base_and_tokenizer, chat_examples):
    run, summary, _, _ = evaluated
    model, tokenizer = base_and_tokenizer
    fresh_base = split_loss(model, tokenizer, chat_examples, max_seq_length=256)
    assert summary["base_loss"] == pytest.approx(fresh_base, abs=1e-5)
    assert abs(summary["finetuned_loss"] - summary["base_loss"]) > 1e-3  # the perturbed adapter changes the model
    assert summary["base_perplexity"] == pytest.approx(math.exp(summary["base_loss"]))
    assert summary["finetuned_perplexity"] == pytest.approx(math.exp(summary["finetuned_loss"]))
    assert json.loads((run / "eval" / "summary.json").read_text()) == summary


def test_progress_reaches_one_in_order(evaluated, chat_examples):
    _, _, calls, _ = evaluated
    fractions = [f for f, _ in calls]
    assert len(calls) == 2 + 2 * len(chat_examples)  # two loss passes, two answers per example
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert calls[0][1].startswith("base loss ") and calls[-1][1] == "answer 3/3 (fine-tuned)"


def test_limit_and_plain_text_examples(make_adapter_run, tmp_path, chat_examples):
    examples = chat_examples + [{"text": "Plain text has no prompt to answer."}]
    run = make_adapter_run(tmp_path / "run", examples=examples)
    summary = evaluate_run(run, max_new_tokens=2, limit=1)
    assert (summary["examples"], summary["answered"], summary["text_examples_without_prompt"]) == (4, 1, 1)
    assert len((run / "eval" / "answers.jsonl").read_text().splitlines()) == 1


def test_empty_split_is_explained(lora_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run_dir, run, ignore=shutil.ignore_patterns("eval"))
    (run / "data" / "test.jsonl").write_text("")
    with pytest.raises(DataError) as err:
        evaluate_run(run)
    assert str(err.value) == (f"{run / 'data' / 'test.jsonl'} is empty: the run has no test examples; train with "
                              "`test_fraction` > 0 (0.1 is typical) or evaluate another split (`validation`)")


def test_full_fine_tune_run_compares_its_two_models(full_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run_dir, run)
    summary = evaluate_run(run, max_new_tokens=2, limit=1)
    assert summary["has_adapter"] is False
    assert abs(summary["finetuned_loss"] - summary["base_loss"]) > 1e-3


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_EXAMPLE = {"messages": [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 C and sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."}], "tools": [WEATHER_TOOL]}


def test_a_tool_examples_answers_are_generated_with_its_tools(make_adapter_run, chat_examples, tmp_path):
    """The question after a tool result is answered (not refused), from the prompt with the example's tool schemas."""
    # (the built-in tool format's system text fills the run's 256 tokens: the loss comes from the plain example)
    run = make_adapter_run(tmp_path / "run", examples=[TOOL_EXAMPLE, chat_examples[0]])
    chat = ChatModel.from_run(run)
    summary = evaluate_run(run, max_new_tokens=MAX_NEW_TOKENS, chat=chat)
    row = json.loads((run / "eval" / "answers.jsonl").read_text().splitlines()[0])
    assert summary["answered"] == 2 and row["reference"] == "It is 18 C and sunny in Paris."
    turns, greedy = TOOL_EXAMPLE["messages"][:-1], dict(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    for side, adapter in (("base", False), ("finetuned", True)):
        with_tools = chat.generate(turns, adapter=adapter, tools=[WEATHER_TOOL], **greedy)
        assert row[f"{side}_answer"] == with_tools != chat.generate(turns, adapter=adapter, **greedy)
