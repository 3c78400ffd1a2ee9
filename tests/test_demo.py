"""The offline demo model: deterministic build, loadable by Auto classes, generates, cached once, and the
quickstart's LoRA run on it reproduces its training answers."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import demo
from finetune.config import RunConfig
from finetune.data import read_jsonl_examples
from finetune.demo import (
    DEMO_LABEL,
    DEMO_VERSION,
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_demo_model,
    corpus_windows,
    default_cache_dir,
    demo_model_path,
    is_demo_model,
)
from finetune.evaluate import exact_match, prompt_and_reference
from finetune.inference import ChatModel
from finetune.train import train

ROOT = Path(__file__).resolve().parents[1]


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture()
def quick_build(monkeypatch):
    """Two pre-training steps instead of the full build: for tests of the cache folders, not of the weights."""
    monkeypatch.setattr(demo, "PRETRAIN_STEPS", 2)


@pytest.fixture()
def one_thread():
    """Train and generate on one thread: a model this small gains nothing from two, and on a busy CPU the second
    thread's waiting multiplies the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_build_is_byte_identical_across_folders(demo_dir, tmp_path):
    first = file_hashes(demo_dir)  # built by demo_model_path in another folder
    second = file_hashes(build_demo_model(tmp_path / "nested" / "b"))
    assert first == second
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "DEMO_MODEL.md"} <= set(first)


def test_pretraining_learns_the_corpus(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    windows = corpus_windows(tokenizer, demo.PRETRAIN_WINDOW)  # (N, window)
    pretrained = AutoModelForCausalLM.from_pretrained(demo_dir)
    torch.manual_seed(0)
    untrained = type(pretrained)(pretrained.config)
    with torch.no_grad():
        pretrained_loss = pretrained(input_ids=windows, labels=windows).loss.item()
        untrained_loss = untrained(input_ids=windows, labels=windows).loss.item()
    assert untrained_loss > 7.0  # about ln(1536) = 7.3: random weights know nothing
    assert pretrained_loss < 2.5


def test_quickstart_lora_learns_its_training_answers_and_the_base_does_not(demo_dir, tmp_path, one_thread):
    """Issue 17: after the offline quickstart, greedy answers to the training prompts are the trained answers."""
    config = RunConfig.from_yaml(ROOT / "examples" / "quickstart.yaml").replace(
        base_model=str(demo_dir), dataset=str(ROOT / "examples" / "data" / "python_qa.jsonl"),
        output_dir=str(tmp_path / "run"))
    train(config)
    chat = ChatModel.from_run(tmp_path / "run")
    pairs = [prompt_and_reference(ex) for ex in read_jsonl_examples(tmp_path / "run" / "data" / "train.jsonl")]
    assert len(pairs) == 32

    def exact_match_rate(adapter: bool) -> float:
        answers = [chat.generate(turns, adapter=adapter, temperature=0.0, max_new_tokens=128) for turns, _ in pairs]
        return sum(exact_match(answer, reference) for answer, (_, reference) in zip(answers, pairs)) / len(pairs)

    assert exact_match_rate(adapter=True) >= 0.8
    assert exact_match_rate(adapter=False) <= 0.1


def test_seed_changes_weights_not_tokenizer(tmp_path, quick_build):
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


def test_demo_model_path_builds_once(tmp_path, quick_build):
    path = demo_model_path(tmp_path)
    assert path.parent == tmp_path and path.name.startswith(f"demo-v{DEMO_VERSION}-")
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert demo_model_path(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary build folders left


def test_demo_model_path_rebuilds_a_damaged_cache(tmp_path, quick_build):
    path = demo_model_path(tmp_path)
    expected = file_hashes(path)
    (path / "model.safetensors").unlink()
    assert demo_model_path(tmp_path) == path
    assert file_hashes(path) == expected
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_changed_build_gets_its_own_folder_and_the_same_build_reuses_it(tmp_path, monkeypatch, quick_build):
    """The cache is keyed by what decides the weights: a build setting or the corpus changed under the same
    DEMO_VERSION (a developer's cache while the build is edited) never reuses the older weights."""
    two_steps = demo_model_path(tmp_path)
    weights = file_hashes(two_steps)["model.safetensors"]
    monkeypatch.setattr(demo, "PRETRAIN_STEPS", 3)
    three_steps = demo_model_path(tmp_path)
    assert three_steps != two_steps and file_hashes(three_steps)["model.safetensors"] != weights
    monkeypatch.setattr(demo, "PRETRAIN_STEPS", 2)
    assert demo_model_path(tmp_path) == two_steps and file_hashes(two_steps)["model.safetensors"] == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([two_steps.name, three_steps.name])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(demo.CORPUS_PATH.read_text(encoding="utf-8") + "\nOne more line.\n", encoding="utf-8")
    name = demo.demo_folder_name()
    monkeypatch.setattr(demo, "CORPUS_PATH", corpus)
    assert demo.demo_folder_name() != name


def test_demo_model_path_keeps_the_folder_of_a_process_that_won_the_race(tmp_path, monkeypatch, quick_build):
    target = tmp_path / demo.demo_folder_name()
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
