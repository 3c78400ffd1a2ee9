"""Real tokenizers and chat templates, tiny real-architecture models: what we train on is what each family defines.

For each family of tests/real_models.py (qwen2, phi3, mistral, gemma2, llama):
- the token ids we train on equal `tokenizer.apply_chat_template(messages, tokenize=True)`;
- the loss-carrying tokens decode, reply by reply, to exactly the assistant replies plus their end-of-turn text, for
  multi-turn rows, rows with a system turn, and unicode with newlines;
- the generation prompt equals `apply_chat_template(..., add_generation_prompt=True)` and is the training prefix;
- a merged adapter's logits equal base + adapter (finetune/merge.py against PEFT).
Mistral v0.3's and Gemma-2's templates can't place a system turn (one moves it, one refuses it): for them the system
text is folded into the first user turn (templates.place_system_turn), so the expected ids are the template applied
to that folded conversation.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import perturb_lora_b
from finetune.merge import merge_adapter
from finetune.templates import IGNORE_INDEX, encode_example, prompt_ids
from real_models import FAMILIES, real_tokenizer, tiny_model

FAMILY_NAMES = sorted(FAMILIES)
# The end-of-turn text each template writes after a reply (Mistral's is its EOS, here the Phi-3 vocabulary's), and
# what the Phi-3 template (also used by the llama family) writes to close a conversation, which the last reply keeps.
END_OF_TURN = {"qwen2": "<|im_end|>", "phi3": "<|end|>", "mistral": "<|endoftext|>", "gemma2": "<end_of_turn>",
               "llama": "<|end|>"}
CLOSING = {"phi3": "<|endoftext|>", "llama": "<|endoftext|>"}
FOLDS_SYSTEM = {"mistral", "gemma2"}

SYSTEM = "You are a terse geography tutor."
MULTI_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
    {"role": "user", "content": "Which of the two is larger?"},
    {"role": "assistant", "content": "Madrid, by population."},
]
CONVERSATIONS = {
    "multi-turn": MULTI_TURN,
    "system": [{"role": "system", "content": SYSTEM}, *MULTI_TURN[:4]],
    "unicode": [{"role": "user", "content": "Écris un haïku sur la mer 🌊\nen trois lignes."},
                {"role": "assistant", "content": "Vagues d'argent —\nle vent efface nos pas 🐚\nsur le sable froid."},
                {"role": "user", "content": "用中文说“谢谢”。"},
                {"role": "assistant", "content": "谢谢！\n\n(xièxie)"}],
}


def as_the_template_takes_it(family: str, messages: list[dict]) -> list[dict]:
    """The conversation the family's template is applied to: a system turn folded into the first user turn
    (system text, blank line, user text) where the template can't place one."""
    if family not in FOLDS_SYSTEM or messages[0]["role"] != "system":
        return messages
    return [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}, *messages[2:]]


def loss_runs(enc) -> list[list[int]]:
    """The loss-carrying token ids, one list per uninterrupted run."""
    runs: list[list[int]] = []
    for i, (t, label) in enumerate(zip(enc["input_ids"], enc["labels"])):
        if label != IGNORE_INDEX:
            if i == 0 or enc["labels"][i - 1] == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(t)
    return runs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one CPU thread is faster than several that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers():
    return {family: real_tokenizer(family) for family in FAMILY_NAMES}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_ids_are_the_templates_and_loss_is_exactly_each_reply(tokenizers, family, conversation):
    tokenizer, messages = tokenizers[family], CONVERSATIONS[conversation]
    enc = encode_example({"messages": messages}, tokenizer, max_seq_length=4096)
    templated = as_the_template_takes_it(family, messages)
    assert enc["input_ids"] == tokenizer.apply_chat_template(templated, tokenize=True)["input_ids"]
    if conversation == "system":
        assert SYSTEM in tokenizer.decode(enc["input_ids"])  # never dropped

    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [reply + END_OF_TURN[family] for reply in replies]
    expected[-1] += CLOSING.get(family, "")
    assert [tokenizer.decode(run) for run in loss_runs(enc)] == expected


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generation_prompt_is_the_templates_and_the_training_prefix(tokenizers, family):
    tokenizer = tokenizers[family]
    for name, messages in CONVERSATIONS.items():
        enc = encode_example({"messages": messages}, tokenizer, max_seq_length=4096)
        for turns in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
            prompt = prompt_ids(messages[:turns], tokenizer)
            templated = as_the_template_takes_it(family, messages[:turns])
            assert prompt == tokenizer.apply_chat_template(templated, tokenize=True,
                                                           add_generation_prompt=True)["input_ids"], name
            assert enc["input_ids"][:len(prompt)] == prompt, name
            assert enc["labels"][len(prompt) - 1] == IGNORE_INDEX and enc["labels"][len(prompt)] != IGNORE_INDEX


# Two fp32 computations of (W + s·B·A)x summed in different orders differ by ~1e-6 on these logits.
FP32_TOLERANCE = 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merged_logits_equal_base_plus_adapter(tmp_path, tokenizers, family):
    tokenizer, base_dir, adapter_dir = tokenizers[family], tmp_path / "base", tmp_path / "adapter"
    tiny_model(family, tokenizer).save_pretrained(str(base_dir))  # merge_adapter reads the adapter's tokenizer
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    perturb_lora_b(peft_model, seed=0)  # B is zero after init: make the adapter change the outputs
    peft_model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))

    merge_adapter(adapter_dir, tmp_path / "merged", check=False)  # compared here instead, independently

    # The saved merged model against the PEFT model (base + adapter, unmerged), on a multi-turn chat longer than
    # the 16-token sliding window of the windowed architectures.
    ids = torch.tensor([encode_example({"messages": MULTI_TURN}, tokenizer, max_seq_length=4096)["input_ids"]])
    assert ids.shape[1] > 32
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.inference_mode():
        merged_logits, adapter_logits = merged(ids).logits, peft_model.eval()(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits
    assert float((merged_logits - adapter_logits).abs().max()) < FP32_TOLERANCE
    assert float((merged_logits - base_logits).abs().max()) > 100 * FP32_TOLERANCE  # the adapter does change them
