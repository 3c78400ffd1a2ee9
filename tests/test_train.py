"""Training on the demo model, CPU: loss goes down, only the adapter changes, trained answers come back.

Each method trains once per module (fixtures) and several tests assert on that run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import RunConfig
from finetune.errors import ConfigError
from finetune.run_folder import RunFolder
from finetune.templates import prompt_ids
from finetune.train import METRIC_FIELDS, TrainObserver, _resume_path, train

ROOT = Path(__file__).resolve().parents[1]

# Two facts the random-weight model can only answer after training.
FACTS = [
    {"messages": [{"role": "user", "content": "What is the capital of Zenovia?"},
                  {"role": "assistant", "content": "The capital of Zenovia is Marlport."}]},
    {"messages": [{"role": "user", "content": "Name a prime number above 10."},
                  {"role": "assistant", "content": "Eleven is a prime number."}]},
]


def memorise_config(demo_model_dir, out: Path, **changes) -> RunConfig:
    """All rows train (no held-out splits); constant high LR: 40 steps memorise both facts on CPU."""
    base = dict(base_model=str(demo_model_dir), learning_rate=5e-3, max_steps=40, batch_size=2,
                gradient_accumulation_steps=1, eval_fraction=0.0, test_fraction=0.0, output_dir=str(out),
                logging_steps=5, max_seq_length=64, lr_scheduler_type="constant", warmup_ratio=0.0, lora_dropout=0.0)
    base.update(changes)
    return RunConfig(**base)


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    ids = torch.tensor([prompt_ids([{"role": "user", "content": question}], tokenizer)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def fresh_state_dict(demo_model_dir, **kw) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32, **kw).state_dict()


@pytest.fixture(scope="module")
def lora_run(demo_model_dir, tmp_path_factory):
    return train(memorise_config(demo_model_dir, tmp_path_factory.mktemp("lora")), rows=FACTS)


@pytest.fixture(scope="module")
def full_run(demo_model_dir, tmp_path_factory):
    return train(memorise_config(demo_model_dir, tmp_path_factory.mktemp("full"), method="full", learning_rate=2e-3),
                 rows=FACTS)


@pytest.fixture(scope="module")
def qlora_run(demo_model_dir, tmp_path_factory):
    return train(memorise_config(demo_model_dir, tmp_path_factory.mktemp("qlora"), method="qlora",
                                 learning_rate=1e-2, max_steps=50), rows=FACTS)


def assert_loss_decreased(run: Path, factor: float) -> None:
    losses = [r["loss"] for r in read_metrics(run) if r["loss"] is not None]
    assert losses[-1] < losses[0] / factor, losses


# ----------------------------------------------------------------------------- LoRA
def test_lora_loss_decreases(lora_run):
    assert lora_run.status == "finished"
    assert_loss_decreased(lora_run.output_dir, factor=3)


def test_lora_changes_only_the_adapter(lora_run, demo_model_dir):
    saved = load_file(lora_run.final_dir / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), "the adapter file holds only LoRA weights"
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k), "B starts at zero and must move"
    fresh = fresh_state_dict(demo_model_dir)
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in lora_run.model.state_dict().items() if "lora_" not in k}
    # under bf16 autocast the frozen projection weights were stored in bf16 while training (fast_trainer): they come
    # back as the bf16-rounded values the run computed with; everything else (embeddings, norms) is untouched
    half = lora_run.results["precision"] == "bf16"
    for name, tensor in fresh.items():
        expected = tensor.to(torch.bfloat16).float() if half and name.endswith("_proj.weight") else tensor
        assert torch.equal(trained[name], expected), f"base weight {name} changed"


def test_lora_reproduces_trained_answers(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora_run.final_dir)
    base = AutoModelForCausalLM.from_pretrained(lora_run.results["base_model_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, lora_run.final_dir).eval()
    for fact in FACTS:
        question, answer = fact["messages"][0]["content"], fact["messages"][1]["content"]
        assert greedy_answer(model, tok, question) == answer


def test_output_folder_is_complete(lora_run):
    out = lora_run.output_dir
    for name in ("run.yaml", "metrics.jsonl", "results.json", "status.json", "data/train.jsonl",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter" / "training_args.bin").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert RunConfig.from_yaml(out / "run.yaml").method == "lora"
    # the chat template used in training travels with the adapter's tokenizer
    from transformers import AutoTokenizer
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out / "adapter").chat_template


# ----------------------------------------------------------------------------- full
def test_full_loss_decreases_and_weights_change(full_run, demo_model_dir):
    assert_loss_decreased(full_run.output_dir, factor=3)
    assert (full_run.final_dir / "model.safetensors").is_file() and full_run.final_dir.name == "model"
    fresh = fresh_state_dict(demo_model_dir)
    trained = fresh_state_dict(full_run.final_dir)
    changed = [k for k in fresh if not torch.equal(fresh[k], trained[k])]
    assert len(changed) == len(fresh), "full fine-tuning updates every weight"
    assert full_run.results["trainable_percent"] == pytest.approx(100.0)


def test_full_reproduces_trained_answers(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(full_run.final_dir)
    model = AutoModelForCausalLM.from_pretrained(full_run.final_dir, dtype=torch.float32).eval()
    for fact in FACTS:
        assert greedy_answer(model, tok, fact["messages"][0]["content"]) == fact["messages"][1]["content"]


# ----------------------------------------------------------------------------- QLoRA (real bitsandbytes on CPU)
def test_qlora_trains_adapters_on_a_frozen_4bit_base(qlora_run, demo_model_dir):
    import bitsandbytes as bnb

    from finetune.models import load_base_model

    assert_loss_decreased(qlora_run.output_dir, factor=2)
    model = qlora_run.model
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit, "the base linear layers are 4-bit"
    q = next(iter(four_bit.values())).weight.quant_state
    assert q.quant_type == "nf4" and q.nested, "NF4 with double quantisation"
    # packed 4-bit weights are bit-identical to a fresh 4-bit load of the same base with the same settings
    fresh = load_base_model(str(demo_model_dir), load_in_4bit=True,
                            precision=qlora_run.results["precision"]).state_dict()
    for name, module in four_bit.items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
        assert torch.equal(module.weight.data, fresh[key]), key
    saved = load_file(qlora_run.final_dir / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)


def test_qlora_reproduces_trained_answer(qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(qlora_run.final_dir)
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16 if qlora_run.results["precision"] == "bf16"
                                 else torch.float32)
    base = AutoModelForCausalLM.from_pretrained(qlora_run.results["base_model_path"], quantization_config=bnb_cfg)
    model = PeftModel.from_pretrained(base, qlora_run.final_dir).eval()
    fact = FACTS[0]["messages"]
    assert greedy_answer(model, tok, fact[0]["content"]) == fact[1]["content"]


# ----------------------------------------------------------------------------- metrics and results
@pytest.fixture(scope="module")
def split_run(demo_model_dir, tmp_path_factory):
    cfg = RunConfig(base_model=str(demo_model_dir), dataset=str(ROOT / "examples/data/python_qa.jsonl"),
                    learning_rate=3e-3, max_steps=8, batch_size=4, gradient_accumulation_steps=1, logging_steps=1,
                    eval_steps=4, max_seq_length=256, output_dir=str(tmp_path_factory.mktemp("split")))
    return train(cfg)


def test_metrics_jsonl_has_every_field(split_run):
    records = read_metrics(split_run.output_dir)
    assert all(list(r) == list(METRIC_FIELDS) for r in records)
    train_recs = [r for r in records if r["loss"] is not None]
    eval_recs = [r for r in records if r["eval_loss"] is not None]
    assert [r["step"] for r in train_recs] == list(range(1, 9))
    assert [r["step"] for r in eval_recs] == [4, 8]
    assert all(r["learning_rate"] is not None and r["grad_norm"] > 0 for r in train_recs)
    tokens = [r["num_tokens"] for r in train_recs]
    assert tokens == sorted(tokens) and tokens[0] > 0, "tokens seen grow"
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)


def test_results_json_fields_and_perplexity(split_run):
    r = json.loads((split_run.output_dir / "results.json").read_text())
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "eval_loss",
                "train_perplexity", "eval_perplexity", "test_loss_before", "test_perplexity_before",
                "test_loss_after", "test_perplexity_after", "trainable_params", "trainable_percent",
                "peak_memory_mb", "versions"):
        assert r[key] is not None, key
    for kind in ("train", "eval"):
        assert r[f"{kind}_perplexity"] == pytest.approx(math.exp(r[f"{kind}_loss"]))
    assert r["test_perplexity_after"] == pytest.approx(math.exp(r["test_loss_after"]))
    assert r["test_loss_after"] < r["test_loss_before"], "training on the data helps on held-out rows"
    assert 0 < r["trainable_percent"] < 100 and r["trainable_params"] > 0
    assert r["peak_memory_mb"] > 50
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(r["versions"])
    assert r["data"]["rows"] == {"train": 32, "validation": 4, "test": 4}
    assert r["data"]["format"] == "messages" and r["data"]["dataset_source"] == "file"


# ----------------------------------------------------------------------------- stop and resume
class StopAfter(TrainObserver):
    def __init__(self, step: int):
        self.step, self.seen = step, []

    def on_log(self, record):
        self.seen.append(record["step"])

    def should_stop(self):
        return bool(self.seen) and self.seen[-1] >= self.step


def test_stop_request_keeps_a_usable_adapter(demo_model_dir, tmp_path):
    cfg = memorise_config(demo_model_dir, tmp_path / "run", logging_steps=1)
    result = train(cfg, StopAfter(3), rows=FACTS)
    assert result.status == "stopped" and result.results["global_step"] == 3
    assert json.loads((tmp_path / "run/status.json").read_text())["state"] == "stopped"
    assert json.loads((tmp_path / "run/results.json").read_text())["status"] == "stopped"
    assert (tmp_path / "run/checkpoints/checkpoint-3").is_dir(), "the stop point is checkpointed"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(demo_model_dir))
    PeftModel.from_pretrained(base, result.final_dir)  # loads


def test_resume_continues_at_the_right_step_with_optimizer_state(demo_model_dir, tmp_path):
    """Stop at step 4, resume to 8: the adapter equals an uninterrupted 8-step run's (same data order, same
    Adam moments, same schedule). A resume that restarted the optimizer or the step count would differ."""
    common = dict(max_steps=8, save_steps=2, logging_steps=1, lr_scheduler_type="linear", learning_rate=3e-3,
                  dataset=str(ROOT / "examples/data/python_qa.jsonl"), eval_fraction=0.0, test_fraction=0.0,
                  batch_size=2, max_seq_length=128)
    straight = train(memorise_config(demo_model_dir, tmp_path / "straight", **common))
    stopped = train(memorise_config(demo_model_dir, tmp_path / "resumed", **common), StopAfter(4))
    assert stopped.results["global_step"] == 4
    shutil.copytree(tmp_path / "resumed", tmp_path / "no_optimizer")
    (tmp_path / "no_optimizer/checkpoints/checkpoint-4/optimizer.pt").unlink()
    resumed = train(memorise_config(demo_model_dir, tmp_path / "resumed", resume_from_checkpoint="latest", **common))
    assert resumed.results["global_step"] == 8
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if r["loss"] is not None]
    assert steps == list(range(1, 9)), "metrics continue where the stopped run left off"
    a = load_file(straight.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    # a resume that lost the Adam moments ends measurably elsewhere, so the check above has teeth
    fresh_optim = train(memorise_config(demo_model_dir, tmp_path / "no_optimizer", resume_from_checkpoint="latest",
                                        **common))
    c = load_file(fresh_optim.final_dir / "adapter_model.safetensors")
    assert any(not torch.allclose(c[k], a[k], atol=1e-5, rtol=1e-4) for k in a)


def test_resume_latest_skips_a_half_written_checkpoint_with_a_notice(tmp_path, caplog):
    """A run killed while saving checkpoint-4 leaves its folder without trainer_state.json (written last):
    `latest` resumes from checkpoint-2 and says which folder it skipped."""
    run = RunFolder(tmp_path)
    for step in (2, 4):
        folder = run.checkpoints_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"0")
    (run.checkpoints_dir / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    config = RunConfig(base_model="demo", dataset="x.jsonl", output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING, logger="finetune.train"):
        assert _resume_path(config) == str(run.checkpoints_dir / "checkpoint-2")
    assert caplog.messages == ["resuming from checkpoint-2: skipping checkpoint-4, written only in part (no complete "
                               "trainer_state.json; the run was likely stopped while saving it)"]
    shutil.rmtree(run.checkpoints_dir / "checkpoint-2")
    with pytest.raises(ConfigError, match="holds no complete checkpoint; start a fresh run"):
        _resume_path(config)


def test_early_stopping_keeps_the_best_checkpoint(demo_model_dir, tmp_path):
    """Full fine-tuning at a high constant rate overfits 32 rows within a few steps, so validation loss turns
    up: training stops after `patience` worse evaluations and the final weights are the best evaluation's."""
    cfg = RunConfig(base_model=str(demo_model_dir), dataset=str(ROOT / "examples/data/python_qa.jsonl"),
                    method="full", learning_rate=1e-2, lr_scheduler_type="constant", warmup_ratio=0.0, max_steps=40,
                    eval_steps=2,
                    early_stopping_patience=2, batch_size=4, gradient_accumulation_steps=1, max_seq_length=128,
                    output_dir=str(tmp_path / "run"))
    result = train(cfg)
    evals = [r for r in read_metrics(tmp_path / "run") if r["eval_loss"] is not None]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert result.results["global_step"] < 40, "stopped early"
    after_best = [r for r in evals if r["step"] > best["step"]]
    assert len(after_best) == 2 and all(r["eval_loss"] > best["eval_loss"] for r in after_best), "patience 2"
    assert result.results["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert result.results["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
