"""Prompt formats and loss masks on the demo tokenizer and real templates: exactly the assistant replies carry loss."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from finetune.config import RunConfig
from finetune.data import SkippedRow
from finetune.demo import demo_model_path
from finetune.errors import ConfigError, DataError
from finetune.prepare import TemplatedTokenizer, prepare_data
from finetune.templates import (
    ALPACA_PREAMBLE,
    ALPACA_TEMPLATE,
    BUILTIN_TEMPLATES,
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    apply_template_choice,
    encode_example,
    ensure_pad_token,
    loss_token_count,
    preview_text,
    prompt_ids,
    render_preview,
    system_turn_notice,
)
from real_models import real_tokenizer, save_tiny_model

# HuggingFaceTB/SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt, no
# generation markers), as published on the Hub.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's format: the template writes the BOS token itself and trims contents.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Re-renders the header as the conversation grows (like templates that count turns or treat the last
# turn specially): not prefix-stable.
TURN_COUNT_TEMPLATE = (
    "{{ messages | length }} turns\n{% for message in messages %}"
    "{{ message['role'] + ':\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + eos_token }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)

SYSTEM = "You answer in one short sentence."
Q1, A1 = "What is the capital of France?", "Paris is the capital of France."
Q2, A2 = "And of Spain?", "Madrid."
CHAT = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                     {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                     {"role": "assistant", "content": A2}]}
NO_SYSTEM_CHAT = {"messages": CHAT["messages"][1:]}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tok(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def loss_text(tokenizer, enc):
    return tokenizer.decode([t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX])


def tokenizer_with_template(tok, template):
    tok.chat_template = template
    return tok


def bos_adding_tokenizer(demo_dir):
    """The demo tokenizer, but adding `<|endoftext|>` as BOS to plain text, like Llama's tokenizers."""
    backend = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                           special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", clean_up_tokenization_spaces=False)


# --- assistant-only loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("example", [CHAT, NO_SYSTEM_CHAT], ids=["system", "no-system"])
def test_demo_chatml_loss_is_exactly_the_replies_and_their_im_end(tok, example):
    enc = encode_example(example, tok, max_seq_length=1024)
    assert loss_text(tok, enc) == f"{A1}<|im_end|>{A2}<|im_end|>"
    assert tok.decode(enc["input_ids"]).startswith("<|im_start|>")
    assert len(enc["input_ids"]) == len(enc["labels"]) == enc["length"] and not enc["truncated"]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(enc["input_ids"], enc["labels"]))


def test_alpaca_template_loss_is_exactly_the_replies_and_eos(tok):
    assert apply_template_choice(tok, "alpaca") == "alpaca"
    enc = encode_example(CHAT, tok, max_seq_length=1024)
    assert tok.decode(enc["input_ids"]) == (
        f"{SYSTEM}\n\n### Instruction:\n{Q1}\n\n### Response:\n{A1}<|im_end|>\n\n"
        f"### Instruction:\n{Q2}\n\n### Response:\n{A2}<|im_end|>\n\n")
    assert loss_text(tok, enc) == f"{A1}<|im_end|>{A2}<|im_end|>"
    no_system = encode_example(NO_SYSTEM_CHAT, tok, max_seq_length=1024)
    assert tok.decode(no_system["input_ids"]).startswith(f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{Q1}")
    assert loss_text(tok, no_system) == f"{A1}<|im_end|>{A2}<|im_end|>"


def test_marker_free_smollm2_template_masks_by_character_spans(tok):
    tokenizer_with_template(tok, SMOLLM2_TEMPLATE)
    enc = encode_example(NO_SYSTEM_CHAT, tok, max_seq_length=1024)
    assert tok.decode(enc["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
    assert loss_text(tok, enc) == f"{A1}<|im_end|>{A2}<|im_end|>"
    # The mask is the same token set the template's own rendering gives the replies.
    segments = render_preview(NO_SYSTEM_CHAT, tok)
    assert [text for text, loss in segments if loss] == [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]


def test_llama3_style_template_keeps_its_own_bos_once(demo_dir):
    tokenizer = tokenizer_with_template(bos_adding_tokenizer(demo_dir), LLAMA3_TEMPLATE)
    enc = encode_example(CHAT, tokenizer, max_seq_length=1024)
    assert enc["input_ids"][:2] != [0, 0] and enc["input_ids"][0] == 0  # one BOS, written by the template
    assert loss_text(tokenizer, enc) == f"{A1}<|eot_id|>{A2}<|eot_id|>"


def test_builtin_template_gets_the_bos_the_tokenizer_would_add(demo_dir):
    tokenizer = bos_adding_tokenizer(demo_dir)
    apply_template_choice(tokenizer, "chatml")
    enc = encode_example(CHAT, tokenizer, max_seq_length=1024)
    assert enc["input_ids"][0] == 0 and enc["input_ids"][1] == 1  # BOS, then <|im_start|>
    assert enc["labels"][0] == IGNORE_INDEX
    # EOS (<|im_end|>) is also the pad token here: it still carries loss, or the model never learns to stop.
    assert loss_text(tokenizer, enc) == f"{A1}<|im_end|>{A2}<|im_end|>"
    assert prompt_ids(CHAT["messages"][:2], tokenizer)[:2] == [0, 1]
    text = encode_example({"text": "Hello"}, tokenizer, max_seq_length=64)
    assert text["input_ids"][0] == 0 and text["input_ids"][-1] == tokenizer.eos_token_id


def test_chatml_on_a_tokenizer_with_another_eos_ends_replies_with_both(demo_dir):
    tokenizer = bos_adding_tokenizer(demo_dir)
    tokenizer.eos_token = "<|endoftext|>"
    apply_template_choice(tokenizer, "chatml")
    enc = encode_example(CHAT, tokenizer, max_seq_length=1024)
    assert loss_text(tokenizer, enc) == f"{A1}<|im_end|><|endoftext|>{A2}<|im_end|><|endoftext|>"


def test_template_not_prefix_stable_falls_back_to_generation_markers(tok):
    tokenizer_with_template(tok, TURN_COUNT_TEMPLATE)
    enc = encode_example(CHAT, tok, max_seq_length=1024)
    assert tok.decode(enc["input_ids"]).startswith("5 turns\nsystem:\n")
    assert loss_text(tok, enc) == f"{A1}<|im_end|>{A2}<|im_end|>"


def test_template_neither_prefix_stable_nor_marked_is_refused(tok):
    # A row-level DataError (was a ConfigError that stopped the run): prepare_data names the row or skips it.
    tokenizer_with_template(tok, TURN_COUNT_TEMPLATE.replace("{% generation %}", "")
                            .replace("{% endgeneration %}", ""))
    with pytest.raises(DataError) as err:
        encode_example(CHAT, tok, max_seq_length=1024)
    assert str(err.value) == (
        "the chat template renders the conversation before assistant reply 1 differently once later turns follow, "
        "so the prompt for that reply isn't what the model would be trained after; use `chat_template: chatml` "
        "(or `alpaca`), or set `train_on_prompt: true`")
    everything = encode_example(CHAT, tok, max_seq_length=1024, train_on_prompt=True)  # needs no mask
    assert everything["labels"] == everything["input_ids"]


def test_template_that_rejects_the_conversation_says_how_to_fix_it(tok):
    tokenizer_with_template(tok, "{{ raise_exception('System role not supported') }}")
    with pytest.raises(DataError, match=r"^the chat template can't render this conversation \(TemplateError: System "
                                        r"role not supported\); use `chat_template: chatml` or `alpaca`$"):
        encode_example(CHAT, tok, max_seq_length=1024)


def test_train_on_prompt_puts_loss_on_every_token(tok):
    enc = encode_example(CHAT, tok, max_seq_length=1024, train_on_prompt=True)
    assert enc["labels"] == enc["input_ids"]
    assert enc["input_ids"] == encode_example(CHAT, tok, max_seq_length=1024)["input_ids"]


def test_text_example_has_loss_on_every_token_and_ends_with_eos(tok):
    enc = encode_example({"text": "Bread needs only four ingredients."}, tok, max_seq_length=64)
    assert tok.decode(enc["input_ids"]) == "Bread needs only four ingredients.<|im_end|>"
    assert enc["labels"] == enc["input_ids"]
    assert loss_token_count(enc) == enc["length"] == len(enc["input_ids"])


def test_pad_token_never_carries_loss(tok):
    enc = encode_example({"text": "one<|endoftext|>two"}, tok, max_seq_length=64, train_on_prompt=True)
    pad_positions = [i for i, t in enumerate(enc["input_ids"]) if t == tok.pad_token_id]
    assert len(pad_positions) == 1 and enc["labels"][pad_positions[0]] == IGNORE_INDEX
    assert loss_token_count(enc) == len(enc["input_ids"]) - 1


def test_truncation_keeps_the_start_and_reports_the_full_length(tok):
    full = encode_example(CHAT, tok, max_seq_length=1024)
    short = encode_example(CHAT, tok, max_seq_length=16)
    assert short["input_ids"] == full["input_ids"][:16] and short["labels"] == full["labels"][:16]
    assert short["length"] == full["length"] > 16
    assert short["truncated"] and not full["truncated"]
    exact = encode_example(CHAT, tok, max_seq_length=full["length"])
    assert not exact["truncated"] and exact["input_ids"] == full["input_ids"]


def test_example_without_messages_or_text_is_a_data_error(tok):
    with pytest.raises(DataError, match=r"^example has neither a `messages` list nor a `text` string \(keys: "
                                        r"\['prompt'\]\)"):
        encode_example({"prompt": "hi"}, tok, max_seq_length=64)


# --- prompts for generation ------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["chatml", "alpaca"])
def test_prompt_ids_are_the_training_prefix_before_each_reply(tok, choice):
    apply_template_choice(tok, choice)
    enc = encode_example(CHAT, tok, max_seq_length=1024)
    for turns in (2, 4):  # up to the first and the second user turn
        prompt = prompt_ids(CHAT["messages"][:turns], tok)
        assert enc["input_ids"][:len(prompt)] == prompt
        assert enc["labels"][len(prompt) - 1] == IGNORE_INDEX and enc["labels"][len(prompt)] != IGNORE_INDEX
    assert tok.decode(prompt_ids(CHAT["messages"][:2], tok)).endswith(
        "<|im_start|>assistant\n" if choice == "chatml" else "### Response:\n")


# --- preview --------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["chatml", "alpaca", "smollm2"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_render_preview_joins_to_the_decoded_input_with_matching_flags(tok, template, train_on_prompt):
    tokenizer_with_template(tok, SMOLLM2_TEMPLATE if template == "smollm2" else BUILTIN_TEMPLATES[template])
    example = {"messages": CHAT["messages"][:3] + [{"role": "user", "content": "Où est-ce ? 🙂"},
                                                   {"role": "assistant", "content": "Là-bas, ça va."}]}
    enc = encode_example(example, tok, max_seq_length=1024, train_on_prompt=train_on_prompt)
    segments = render_preview(example, tok, train_on_prompt=train_on_prompt)
    assert "".join(text for text, _ in segments) == tok.decode(enc["input_ids"])
    assert all(a[1] != b[1] for a, b in zip(segments, segments[1:]))  # adjacent flags merged
    assert all(text for text, _ in segments)
    loss_segments = [text for text, loss in segments if loss]
    if train_on_prompt:
        assert segments == [(tok.decode(enc["input_ids"]), True)]
    else:
        assert loss_segments == [f"{A1}<|im_end|>", "Là-bas, ça va.<|im_end|>"]
        assert "".join(loss_segments) == loss_text(tok, enc)


def test_render_preview_respects_truncation(tok):
    first_reply_token = encode_example(CHAT, tok, max_seq_length=1024)["labels"].index(
        tok("Paris", add_special_tokens=False)["input_ids"][0])
    cut = first_reply_token + 2  # tokens
    segments = render_preview(CHAT, tok, max_seq_length=cut)
    enc = encode_example(CHAT, tok, max_seq_length=cut)
    assert "".join(text for text, _ in segments) == tok.decode(enc["input_ids"])
    assert [loss for _, loss in segments] == [False, True]  # cut inside the first reply


def test_preview_text_wraps_loss_carrying_text():
    assert preview_text([("Q: hi\nA: ", False), ("hello<|im_end|>", True), ("\n", False)]) == (
        "Q: hi\nA: [[hello<|im_end|>]]\n")


# --- choosing a template --------------------------------------------------------------------------

def test_apply_template_choice_on_a_tokenizer_with_a_template(tok):
    own = tok.chat_template
    assert apply_template_choice(tok, "auto") == "tokenizer" and tok.chat_template == own
    assert apply_template_choice(tok, "tokenizer") == "tokenizer" and tok.chat_template == own
    assert apply_template_choice(tok, "alpaca") == "alpaca" and tok.chat_template == ALPACA_TEMPLATE
    assert apply_template_choice(tok, "chatml") == "chatml" and tok.chat_template == CHATML_TEMPLATE


def test_apply_template_choice_on_a_tokenizer_without_one(tok):
    tok.chat_template = None
    with pytest.raises(ConfigError) as err:
        apply_template_choice(tok, "tokenizer")
    assert str(err.value) == ("`chat_template: tokenizer` but this tokenizer has no chat template; use "
                              "`chat_template: chatml` or `alpaca`")
    assert apply_template_choice(tok, "auto") == "chatml" and tok.chat_template == CHATML_TEMPLATE


def test_apply_template_choice_rejects_unknown_names(tok):
    with pytest.raises(ConfigError) as err:
        apply_template_choice(tok, "vicuna")
    assert str(err.value) == "`chat_template` must be one of auto, tokenizer, chatml, alpaca (got 'vicuna')"


def test_encoding_without_any_template_names_the_fix(tok):
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"^this tokenizer has no chat template; set `chat_template: chatml`"):
        encode_example(CHAT, tok, max_seq_length=64)


def test_chosen_template_is_saved_with_the_tokenizer(tok, tmp_path):
    apply_template_choice(tok, "alpaca")
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == ALPACA_TEMPLATE


def test_ensure_pad_token_falls_back_to_eos(tok):
    tok.pad_token = None
    ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    tok.pad_token = None
    apply_template_choice(tok, "chatml")
    assert tok.pad_token == "<|im_end|>"


# --- any reply text -------------------------------------------------------------------------------

reply_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<"),
                     min_size=1, max_size=40).map(str.strip).filter(bool)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=reply_text, answer=reply_text, template=st.sampled_from(["chatml", "alpaca", "smollm2"]))
def test_any_reply_is_masked_exactly_and_previewed_faithfully(tok, question, answer, template):
    tokenizer_with_template(tok, SMOLLM2_TEMPLATE if template == "smollm2" else BUILTIN_TEMPLATES[template])
    example = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    enc = encode_example(example, tok, max_seq_length=4096)
    assert loss_text(tok, enc) == f"{answer}<|im_end|>"
    segments = render_preview(example, tok)
    assert "".join(text for text, _ in segments) == tok.decode(enc["input_ids"])
    assert [text for text, loss in segments if loss] == [f"{answer}<|im_end|>"]


# --- real templates that re-render history or can't place a system turn (issue 14) ------------------

def replies_text(tokenizer, enc) -> list[str]:
    """The loss-carrying tokens, decoded one reply (one run of loss tokens) at a time."""
    runs, run = [], []
    for t, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    return [tokenizer.decode(r) for r in runs + ([run] if run else [])]


def test_phi3_multi_turn_trains_every_reply_though_each_render_ends_with_eos():
    tokenizer = real_tokenizer("phi3")  # its template closes every render without a generation prompt with EOS
    enc = encode_example(NO_SYSTEM_CHAT, tokenizer, max_seq_length=1024)
    assert enc["input_ids"] == tokenizer.apply_chat_template(NO_SYSTEM_CHAT["messages"], tokenize=True)["input_ids"]
    # Each reply with its <|end|>; the last one also with the EOS that closes the conversation.
    assert replies_text(tokenizer, enc) == [f"{A1}<|end|>", f"{A2}<|end|><|endoftext|>"]
    prompt = prompt_ids(NO_SYSTEM_CHAT["messages"][:3], tokenizer)
    assert enc["input_ids"][:len(prompt)] == prompt and enc["labels"][len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("family, problem", [
    ("mistral", "moves the system text as the conversation grows (earlier turns lose it)"),
    ("gemma2", "refuses a system turn (TemplateError: System role not supported)"),
])
def test_system_turn_the_template_cannot_place_goes_into_the_first_user_turn(family, problem, caplog):
    tokenizer = real_tokenizer(family)
    notice = (f"the chat template {problem}; the system text goes at the start of the first user turn instead, "
              "followed by a blank line")
    assert system_turn_notice(tokenizer, [NO_SYSTEM_CHAT]) is None  # no system turn, nothing to say
    assert system_turn_notice(tokenizer, [NO_SYSTEM_CHAT, CHAT]) == notice
    with caplog.at_level("WARNING", logger="finetune.templates"):
        enc = encode_example(CHAT, tokenizer, max_seq_length=1024)
        encode_example(CHAT, tokenizer, max_seq_length=1024)
    assert [r.getMessage() for r in caplog.records] == [notice]  # one line, once
    folded = [{"role": "user", "content": f"{SYSTEM}\n\n{Q1}"}, *CHAT["messages"][2:]]
    assert enc["input_ids"] == tokenizer.apply_chat_template(folded, tokenize=True)["input_ids"]
    end = "<|endoftext|>" if family == "mistral" else "<end_of_turn>"  # Mistral's EOS on the Phi-3 vocabulary
    assert replies_text(tokenizer, enc) == [f"{A1}{end}", f"{A2}{end}"]
    assert preview_text(render_preview(CHAT, tokenizer)).count(f"{SYSTEM}\n\n{Q1}") == 1
    # Prompts for generation place it the same way, so they match training.
    assert enc["input_ids"][:len(prompt_ids(CHAT["messages"][:4], tokenizer))] == prompt_ids(
        CHAT["messages"][:4], tokenizer)


UNENCODABLE_ROWS = [{"instruction": Q1, "output": A1},
                    {"instruction": Q2, "output": "Madrid.<|end|> And Lisbon."},
                    {"instruction": "And of Italy?", "output": "Rome."}]
UNENCODABLE_REASON = ("assistant reply 1 contains the chat template's end-of-turn text '<|end|>', so where the reply "
                      "ends is ambiguous; remove that text from the reply")


def prepare_with(tokenizer, tmp_path, **settings):
    """`prepare_data` on UNENCODABLE_ROWS as the file qa.json, encoded with `tokenizer`."""
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(UNENCODABLE_ROWS), encoding="utf-8")
    config = RunConfig(dataset=str(data), eval_fraction=0.0, test_fraction=0.0, **settings)
    return prepare_data(config, tokenizer_for=lambda _: TemplatedTokenizer(source=None, tokenizer=tokenizer,
                                                                           template="tokenizer"))


def test_row_the_template_cannot_encode_is_a_row_error_naming_the_row(tmp_path):
    with pytest.raises(DataError) as err:
        prepare_with(real_tokenizer("phi3"), tmp_path)
    assert str(err.value) == f"qa.json, row 2: {UNENCODABLE_REASON} (or set skip_invalid: true to drop bad rows)"
    assert (err.value.row, err.value.field) == (2, "messages")


def test_row_the_template_cannot_encode_is_skipped_with_skip_invalid(tmp_path):
    data = prepare_with(real_tokenizer("phi3"), tmp_path, skip_invalid=True).examples
    assert data.skipped == [SkippedRow(2, UNENCODABLE_REASON)]
    assert sorted(ex["messages"][1]["content"] for ex in data.splits.train) == [A1, "Rome."]


def test_preview_shows_the_system_turn_notice_and_skips_rows_it_cannot_encode(tmp_path, capsys):
    from finetune.cli import main

    base = save_tiny_model(tmp_path / "gemma", "gemma2")
    rows = [{"system": SYSTEM, "instruction": Q1, "output": A1},
            {"instruction": Q2, "output": "Madrid.<end_of_turn> And Lisbon."}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    code = main(["preview", "--base_model", str(base), "--dataset", str(tmp_path / "rows.jsonl"), "--skip_invalid",
                 "true", "--eval_fraction", "0", "--test_fraction", "0", "-n", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert ("note: the chat template refuses a system turn (TemplateError: System role not supported); the system "
            "text goes at the start of the first user turn instead, followed by a blank line\n") in out
    assert ("skipped 1 invalid rows, e.g. row 2: assistant reply 1 contains the chat template's end-of-turn text "
            "'<end_of_turn>', so where the reply ends is ambiguous; remove that text from the reply\n") in out
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{Q1}<end_of_turn>\n<start_of_turn>model\n[[{A1}<end_of_turn>]]\n" in out
