"""ChatModel: one base copy answers as base (adapter off) and as fine-tuned (adapter on), streamed or whole."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from finetune.errors import ModelError
from finetune.inference import ChatModel, locate_run, stop_token_ids, with_system_prompt
from finetune.merge import merge_adapter
from finetune.templates import prompt_ids

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def chat(lora_run_dir) -> ChatModel:
    return ChatModel.from_run(lora_run_dir)


def reference_greedy(model_dir, tokenizer_dir, messages, max_new_tokens: int) -> str:
    """A greedy answer from a freshly loaded model, built only from transformers calls."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(messages, tokenizer)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_adapter_off_answers_like_a_fresh_base(chat, demo_model_dir, lora_run_dir):
    expected = reference_greedy(demo_model_dir, lora_run_dir / "adapter", QUESTION, GREEDY["max_new_tokens"])
    assert chat.generate(QUESTION, adapter=False, **GREEDY) == expected


def test_adapter_on_answers_like_the_merged_model(chat, lora_run_dir, tmp_path):
    merge_adapter(lora_run_dir, tmp_path / "merged", check=False)
    expected = reference_greedy(tmp_path / "merged", tmp_path / "merged", QUESTION, GREEDY["max_new_tokens"])
    finetuned = chat.generate(QUESTION, adapter=True, **GREEDY)
    assert finetuned == expected
    assert finetuned != chat.generate(QUESTION, adapter=False, **GREEDY)  # the adapter matters
    assert chat.generate(QUESTION, adapter=True, **GREEDY) == finetuned  # switching off didn't stick


def test_only_one_copy_of_the_base_weights(lora_run_dir, demo_model_dir):
    def llama_instances() -> int:
        gc.collect()
        return sum(issubclass(type(o), LlamaForCausalLM) for o in gc.get_objects())

    before = llama_instances()
    chat = ChatModel.from_run(lora_run_dir)
    assert chat.has_adapter and chat.has_finetuned
    assert llama_instances() - before == 1

    chat.generate(QUESTION, adapter=False, max_new_tokens=2, temperature=0)
    chat.generate(QUESTION, adapter=True, max_new_tokens=2, temperature=0)
    list(chat.stream_both(QUESTION, max_new_tokens=2, temperature=0))
    assert llama_instances() - before == 1  # switching or answering both at once didn't load a second model

    # Every base weight is held by exactly one tensor: as many distinct storages as the base model has.
    base_storages = {p.data_ptr() for name, p in chat.model.named_parameters() if "lora_" not in name}
    fresh = AutoModelForCausalLM.from_pretrained(str(demo_model_dir))
    assert len(base_storages) == len(list(fresh.parameters()))  # parameters() yields tied weights once


def test_stream_chunks_join_to_the_generated_text(chat):
    streamed = list(chat.stream(QUESTION, adapter=True, **GREEDY))
    assert len(streamed) > 1  # a real stream, not one final chunk
    assert "".join(streamed) == chat.generate(QUESTION, adapter=True, **GREEDY)

    sampled = dict(temperature=1.0, top_p=0.95, top_k=40, max_new_tokens=12, seed=7)
    assert "".join(chat.stream(QUESTION, adapter=False, **sampled)) == chat.generate(QUESTION, adapter=False,
                                                                                      **sampled)


def test_seed_makes_sampling_reproducible(chat):
    sampled = dict(temperature=1.5, max_new_tokens=16)
    first = chat.generate(QUESTION, seed=1, **sampled)
    assert chat.generate(QUESTION, seed=1, **sampled) == first
    assert any(chat.generate(QUESTION, seed=s, **sampled) != first for s in (2, 3, 4))


def test_closing_a_stream_early_stops_generation_and_frees_the_model(chat):
    stream = chat.stream(QUESTION, adapter=False, temperature=0.0, max_new_tokens=1500)
    next(stream)
    started = time.perf_counter()
    stream.close()  # the user pressed Stop: the worker must end at the next token and release the lock
    # 1500 tokens take ~10 s or more on a CPU; stopping at the next one takes milliseconds.
    assert time.perf_counter() - started < 3.0
    assert chat.generate(QUESTION, **GREEDY) == chat.generate(QUESTION, **GREEDY)


def test_concurrent_callers_get_their_own_side(chat):
    expected = {side: chat.generate(QUESTION, adapter=side, **GREEDY) for side in (False, True)}
    results: list[tuple[bool, str]] = []

    def ask(side: bool) -> None:
        results.append((side, "".join(chat.stream(QUESTION, adapter=side, **GREEDY))))

    threads = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 6
    assert all(answer == expected[side] for side, answer in results)


def separate_answers(chat, base_messages, finetuned_messages=None, **settings) -> tuple[str, str]:
    """The two answers one at a time: adapter off for the base, on for the fine-tuned side."""
    return (chat.generate(base_messages, adapter=False, **settings),
            chat.generate(finetuned_messages or base_messages, adapter=True, **settings))


def assert_one_pass(updates) -> None:
    """Both rows of one batched `generate` get a token per step: while neither side is done, they have as many."""
    assert len(updates) > 2  # a real stream
    assert all(base.tokens == tuned.tokens for base, tuned in updates if not (base.done or tuned.done))
    assert updates[-1][0].done and updates[-1][1].done


def test_both_answers_in_one_pass_equal_the_separate_answers(chat):
    updates = list(chat.stream_both(QUESTION, **GREEDY))
    assert chat.answers_together
    assert_one_pass(updates)
    base, tuned = updates[-1]
    assert (base.text, tuned.text) == separate_answers(chat, QUESTION, **GREEDY)
    assert base.text != tuned.text
    assert any(0 < b.tokens < base.tokens and 0 < t.tokens < tuned.tokens for b, t in updates)  # grew together


def test_qlora_answers_both_in_one_pass(make_adapter_run, tmp_path):
    chat = ChatModel.from_run(make_adapter_run(tmp_path / "qlora", method="qlora"))
    assert chat.model.is_loaded_in_4bit and chat.answers_together
    updates = list(chat.stream_both(QUESTION, **GREEDY))
    assert_one_pass(updates)
    base, tuned = updates[-1]
    assert (base.text, tuned.text) == separate_answers(chat, QUESTION, **GREEDY)
    assert base.text != tuned.text


def test_each_pane_answers_its_own_history(chat):
    """The compare panes keep their own histories: prompts of different lengths, left-padded in one batch."""
    base_history = QUESTION + [{"role": "assistant", "content": "Lyon."}, {"role": "user", "content": "Sure?"}]
    tuned_history = QUESTION + [{"role": "assistant", "content": "It is Paris, on the Seine."},
                                {"role": "user", "content": "Sure?"}]
    updates = list(chat.stream_both(base_history, tuned_history, **GREEDY))
    assert_one_pass(updates)
    base, tuned = updates[-1]
    assert (base.text, tuned.text) == separate_answers(chat, base_history, tuned_history, **GREEDY)


def test_a_side_that_ends_its_turn_early_leaves_the_other_going(chat, monkeypatch):
    settings = dict(temperature=0.0, max_new_tokens=16)
    full_base, full_tuned = separate_answers(chat, QUESTION, **settings)
    tuned_ids = set(chat.tokenizer(full_tuned, add_special_tokens=False).input_ids)
    # Make a token of the base answer (one the fine-tuned answer doesn't use) a stop token: the base side ends there.
    stop = next(t for t in chat.tokenizer(full_base, add_special_tokens=False).input_ids[2:] if t not in tuned_ids)
    monkeypatch.setattr(chat, "stop_ids", chat.stop_ids + [stop])
    short_base, tuned_text = separate_answers(chat, QUESTION, **settings)
    assert len(short_base) < len(full_base) and tuned_text == full_tuned

    updates = list(chat.stream_both(QUESTION, **settings))
    base, tuned = updates[-1]
    assert (base.text, tuned.text) == (short_base, full_tuned)
    assert base.tokens < tuned.tokens == settings["max_new_tokens"]
    after_base_ended = [t for b, t in updates if b.done and not t.done]
    assert len(after_base_ended) > 1 and all(b.text == short_base for b, t in updates if b.done)


def test_both_answers_sampled_are_reproducible(chat):
    sampled = dict(temperature=1.0, top_p=0.95, top_k=40, max_new_tokens=12, seed=7)
    first = [pane.text for pane in list(chat.stream_both(QUESTION, **sampled))[-1]]
    assert [pane.text for pane in list(chat.stream_both(QUESTION, **sampled))[-1]] == first
    assert first[0] != first[1]


def test_closing_both_answers_early_stops_generation(chat):
    updates = chat.stream_both(QUESTION, temperature=0.0, max_new_tokens=1500)
    next(updates)
    started = time.perf_counter()
    updates.close()
    assert time.perf_counter() - started < 3.0
    assert chat.generate(QUESTION, **GREEDY) == chat.generate(QUESTION, **GREEDY)


def test_dora_adapter_answers_both_one_after_the_other(demo_model_dir, tmp_path):
    """PEFT refuses mixed-adapter batches with DoRA: the two answers then come one after the other."""
    from peft import LoraConfig, get_peft_model

    from conftest import perturb_lora_b

    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    perturb_lora_b(model, seed=0)
    model.save_pretrained(str(tmp_path / "dora"))
    chat = ChatModel(str(demo_model_dir), tmp_path / "dora", tokenizer_path=demo_model_dir)
    assert chat.has_adapter and not chat.answers_together
    base, tuned = list(chat.stream_both(QUESTION, **GREEDY))[-1]
    assert (base.text, tuned.text) == separate_answers(chat, QUESTION, **GREEDY)


def test_full_fine_tune_answers_both_one_after_the_other(full_run_dir):
    chat = ChatModel.from_run(full_run_dir)
    assert not chat.answers_together
    updates = list(chat.stream_both(QUESTION, **GREEDY))
    base, tuned = updates[-1]
    assert (base.text, tuned.text) == separate_answers(chat, QUESTION, **GREEDY)
    assert all(t.tokens == 0 for b, t in updates if not b.done)  # the fine-tuned side starts once the base is done


def test_full_fine_tune_loads_base_and_fine_tuned_models(full_run_dir, demo_model_dir):
    chat = ChatModel.from_run(full_run_dir)
    assert not chat.has_adapter and chat.has_finetuned
    n = GREEDY["max_new_tokens"]
    assert chat.generate(QUESTION, adapter=False, **GREEDY) == reference_greedy(demo_model_dir, full_run_dir / "model",
                                                                                QUESTION, n)
    assert chat.generate(QUESTION, adapter=True, **GREEDY) == reference_greedy(
        full_run_dir / "model", full_run_dir / "model", QUESTION, n)


def test_locate_run_reads_base_and_method(lora_run_dir, full_run_dir, demo_model_dir):
    run = locate_run(lora_run_dir)
    assert (run.adapter_dir, run.model_dir, run.method) == (lora_run_dir / "adapter", None, "lora")
    assert run.base_path == str(demo_model_dir)
    assert locate_run(lora_run_dir / "adapter").run_dir == lora_run_dir
    full = locate_run(full_run_dir)
    assert (full.adapter_dir, full.model_dir, full.method) == (None, full_run_dir / "model", "full")


def test_stop_ids_include_end_of_turn(chat):
    im_end = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in chat.stop_ids
    assert stop_token_ids(chat.tokenizer) == [im_end]  # the demo tokenizer's EOS is <|im_end|> itself


def test_system_prompt_is_added_only_when_missing():
    user = {"role": "user", "content": "hi"}
    system = {"role": "system", "content": "Be brief."}
    assert with_system_prompt("hi", None) == [user]
    assert with_system_prompt([user], "Be kind.") == [{"role": "system", "content": "Be kind."}, user]
    assert with_system_prompt([system, user], "Be kind.") == [system, user]
    with pytest.raises(ValueError, match="must end with a user turn"):
        with_system_prompt([user, {"role": "assistant", "content": "hello"}], None)


def test_missing_run_folder_is_explained(tmp_path):
    with pytest.raises(ModelError) as err:
        ChatModel.from_run(tmp_path / "gone")
    assert str(err.value).startswith(f"run folder not found: {tmp_path / 'gone'}; ")


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval", "merged"))
    return dst


def set_recorded_base(adapter_dir, base: str) -> None:
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config))


def test_base_model_is_found_from_results_then_adapter_then_run_yaml(lora_run_dir, demo_model_dir, tmp_path):
    run = copy_run(lora_run_dir, tmp_path / "run")
    set_recorded_base(run / "adapter", str(tmp_path / "moved-away"))
    assert locate_run(run).base_path == str(demo_model_dir)  # run.yaml's base_model
    other = shutil.copytree(demo_model_dir, tmp_path / "base-copy")
    set_recorded_base(run / "adapter", str(other))
    assert locate_run(run).base_path == str(other)  # the adapter's record beats run.yaml
    (run / "results.json").write_text(json.dumps({"base_model_path": str(demo_model_dir)}))
    assert locate_run(run).base_path == str(demo_model_dir)  # results.json's resolved path beats both


def test_adapter_alone_with_a_vanished_base_is_explained(lora_run_dir, tmp_path):
    adapter = shutil.copytree(lora_run_dir / "adapter", tmp_path / "adapter")
    set_recorded_base(adapter, str(tmp_path / "gone-base"))
    with pytest.raises(ModelError) as err:
        locate_run(adapter)
    assert str(err.value) == (f"can't find the base model that {adapter} was trained from: {tmp_path / 'gone-base'} "
                              "doesn't exist any more, and there is no run.yaml beside it; point to the run folder, "
                              "or put the base model back in place")


def test_run_without_a_saved_tokenizer_rebuilds_its_template(lora_run_dir, chat, tmp_path):
    run = copy_run(lora_run_dir, tmp_path / "run")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (run / "adapter" / name).unlink(missing_ok=True)
    assert locate_run(run).chat_template_choice == "auto"
    rebuilt = ChatModel.from_run(run)
    assert rebuilt.tokenizer.chat_template
    assert rebuilt.generate(QUESTION, **GREEDY) == chat.generate(QUESTION, **GREEDY)
