"""The offline demo model: deterministic build, loadable by Auto classes, generates, cached once."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import demo
from finetune.demo import (
    DEMO_LABEL,
    DEMO_VERSION,
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_demo_model,
    default_cache_dir,
    demo_model_path,
    is_demo_model,
)


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo_model_path(tmp_path_factory.mktemp("cache"))


def test_build_is_byte_identical_across_folders(tmp_path):
    first = file_hashes(build_demo_model(tmp_path / "a"))
    second = file_hashes(build_demo_model(tmp_path / "nested" / "b"))
    assert first == second
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "DEMO_MODEL.md"} <= set(first)


def test_seed_changes_weights_not_tokenizer(tmp_path):
    base = file_hashes(build_demo_model(tmp_path / "s0", seed=0))
    other = file_hashes(build_demo_model(tmp_path / "s1", seed=1))
    assert base["model.safetensors"] != other["model.safetensors"]
    assert base["tokenizer.json"] == other["tokenizer.json"]


def test_loads_with_auto_classes_and_is_labelled(demo_dir):
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (128, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert model.config.vocab_size == len(tokenizer) == demo.VOCAB_SIZE
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tokenizer.is_fast
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.convert_tokens_to_ids([PAD_TOKEN, IM_START, IM_END]) == [0, 1, 2]
    assert json.loads((demo_dir / "config.json").read_text())["finetune_demo"] is True
    assert DEMO_LABEL in (demo_dir / "DEMO_MODEL.md").read_text()


def test_generation_config_stops_on_im_end(demo_dir):
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert model.generation_config.pad_token_id == tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                           return_tensors="pt")["input_ids"]  # (1, T)
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 5
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    again = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)  # greedy is deterministic


def test_tokenizer_round_trips_text_and_knows_common_words(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    text = "Héllo, wörld! def main():\n    return 42  # buenos días 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.tokenize(" the model") == ["Ġthe", "Ġmodel"]  # learnt from the corpus
    assert tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 1  # one special token


def test_chat_template_marks_replies_with_their_im_end(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "Hello<|im_end|>"
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_demo_model_path_builds_once(tmp_path):
    path = demo_model_path(tmp_path)
    assert path == tmp_path / f"demo-v{DEMO_VERSION}"
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert demo_model_path(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary build folders left


def test_demo_model_path_rebuilds_a_damaged_cache(tmp_path):
    path = demo_model_path(tmp_path)
    expected = file_hashes(path)
    (path / "model.safetensors").unlink()
    assert demo_model_path(tmp_path) == path
    assert file_hashes(path) == expected
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_demo_model_path_keeps_the_folder_of_a_process_that_won_the_race(tmp_path, monkeypatch):
    target = tmp_path / f"demo-v{DEMO_VERSION}"
    real_build = demo.build_demo_model

    def build_while_another_process_finishes_first(out_dir, **kwargs):
        real_build(tmp_path / "other", **kwargs)
        (tmp_path / "other").rename(target)  # the other process's atomic rename lands first
        (target / "winner.txt").write_text("theirs")
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(demo, "build_demo_model", build_while_another_process_finishes_first)
    assert demo_model_path(tmp_path) == target
    assert (target / "winner.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # our temporary build was removed


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FINETUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "finetune"


def test_is_demo_model(demo_dir, tmp_path):
    assert is_demo_model(demo_dir) and is_demo_model(str(demo_dir))
    assert is_demo_model("demo")
    assert not is_demo_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not is_demo_model(tmp_path)
    (tmp_path / "config.json").write_text("not json")
    assert not is_demo_model(tmp_path)
