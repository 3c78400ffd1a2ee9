"""The speed layer (finetune/speed) against stock TRL `SFTTrainer`: same batch, same loss and gradients.

Each trainer is built by `finetune.train.sft_trainer` from the same arguments (`speed: on` and `speed: off`), on
copies of one model, and computes the loss of one batch through its own collator and `compute_loss`, then backward.
fp32, no dropout: the two computations differ only in rounding order (TRL pads, ours packs; TRL's fused LM head
vs ours on target positions), so they agree to ~1e-6; a wrong mask or a wrong divisor is off by far more.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from finetune.config import RunConfig
from finetune.templates import IGNORE_INDEX
from finetune.train import _sft_args, sft_trainer

TOLERANCE = 1e-4  # relative, loss and every trainable gradient


def features(vocab: int, lengths: tuple[int, ...]) -> list[dict]:
    """Random examples whose first third is a prompt without loss."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3:]})
    return out


def build(config: RunConfig, model, tokenizer, rows: list[dict]):
    from datasets import Dataset

    args = _sft_args(config, "fp32", total_steps=1, eval_every=1, save_every=1, has_eval=False)
    return sft_trainer(config, model=model, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer)


def loss_and_grads(trainer, rows: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-batch as training computes it: the trainer's collator, its target count, its loss, backward."""
    model = trainer.model.train()
    model.zero_grad()
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    count = trainer._get_num_items_in_batch([batch], trainer.args.device)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=count)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(ours: tuple[float, dict], stock: tuple[float, dict]) -> None:
    assert ours[0] == pytest.approx(stock[0], rel=TOLERANCE)
    assert ours[1].keys() == stock[1].keys() and stock[1]
    for name, grad in stock[1].items():
        assert grad.norm() > 0, f"{name}: a gradient that is zero compares nothing"
        difference = ((ours[1][name] - grad).norm() / grad.norm()).item()
        assert difference < TOLERANCE, f"{name}: relative difference {difference:.2e}"


def parity(model, tokenizer, rows: list[dict], method: str, **changes) -> None:
    from trl import SFTTrainer

    from finetune.speed.fast_trainer import FastSFTTrainer

    config = RunConfig(base_model="unused", method=method, lora_dropout=0.0, max_seq_length=256, **changes)
    if method == "lora":  # the adapter wraps the model once, so both trainers start from the same weights
        from peft import LoraConfig, get_peft_model

        from conftest import perturb_lora_b

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        perturb_lora_b(model, seed=0)  # B = 0 after init would leave every A gradient zero
    ours = build(config, copy.deepcopy(model), tokenizer, rows)
    stock = build(config.replace(speed=False), copy.deepcopy(model), tokenizer, rows)
    assert type(ours) is FastSFTTrainer and type(stock) is SFTTrainer
    assert ours.batching is not None, "our side packs the batch"
    assert_same(loss_and_grads(ours, rows), loss_and_grads(stock, rows))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_demo_model_loss_and_gradients_equal_stock_sft_trainer(demo_model_dir, method):
    from transformers import AutoModelForCausalLM

    from finetune.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(str(demo_model_dir))
    parity(model, tokenizer, features(model.config.vocab_size, (9, 14, 5)), method)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_windowed_architecture_loss_and_gradients_equal_stock_sft_trainer(method):
    """Qwen2 with a sliding window of 16 and examples longer than it: TRL pads, ours packs."""
    from real_models import real_tokenizer, tiny_model

    tokenizer = real_tokenizer("qwen2")
    model = tiny_model("qwen2", tokenizer, window=16)
    parity(model, tokenizer, features(model.config.vocab_size, (40, 23, 31)), method)


def test_every_lever_off_still_equals_stock_sft_trainer(demo_model_dir):
    """The plain paths the levers replace compute the same loss too (what the benchmark's switches measure)."""
    from transformers import AutoModelForCausalLM

    from finetune.models import load_tokenizer
    from finetune.speed import LEVERS

    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(str(demo_model_dir))
    rows = features(model.config.vocab_size, (9, 14, 5))
    parity(model, tokenizer, rows, "full", speed_levers_off=list(LEVERS))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_speed_off_trains_with_stock_sft_trainer_and_learns_the_same(demo_model_dir, tmp_path, checkpointing):
    """Whole runs, fp32, no dropout: `speed: off` (stock SFTTrainer) and ours log the same losses and save the
    same adapter; also with gradient checkpointing (QLoRA's and full fine-tuning's presets), where per-example
    attention stands aside (its saved tensors don't match a recomputation)."""
    from safetensors.torch import load_file

    from finetune.train import train

    data = Path(__file__).resolve().parents[1] / "examples/data/python_qa.jsonl"
    common = dict(base_model=str(demo_model_dir), dataset=str(data), max_rows=8, eval_fraction=0.0,
                  test_fraction=0.0, max_steps=2, batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
                  learning_rate=3e-3, lora_dropout=0.0, precision="fp32", max_seq_length=128)
    runs = {speed: train(RunConfig(**common, speed=speed, gradient_checkpointing=checkpointing,
                                   output_dir=str(tmp_path / str(speed))))
            for speed in (True, False)}
    assert runs[True].results["train_loss"] == pytest.approx(runs[False].results["train_loss"], rel=TOLERANCE)
    a = load_file(runs[True].final_dir / "adapter_model.safetensors")
    b = load_file(runs[False].final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # Adam divides by each gradient's own size: a near-zero one turns a 1e-9 difference into ~1e-6 of weight
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_speed_switches_are_validated_and_round_trip_through_yaml(tmp_path):
    from finetune.errors import ConfigError

    config = RunConfig(speed=False, speed_levers_off=["segments", "cpu_dropout"])
    config.to_yaml(tmp_path / "run.yaml")
    assert RunConfig.from_yaml(tmp_path / "run.yaml") == config
    (tmp_path / "off.yaml").write_text("speed: off\nspeed_levers_off: [segments]\n", encoding="utf-8")
    loaded = RunConfig.from_yaml(tmp_path / "off.yaml")
    assert loaded.speed is False and loaded.speed_levers_off == ["segments"]
    with pytest.raises(ConfigError) as e:
        RunConfig(speed_levers_off=["segments", "flash"])
    assert str(e.value) == ("`speed_levers_off` has unknown lever(s) 'flash'; choose from segments, target_head, "
                            "chunked_loss, half_frozen_weights, cpu_dropout (padding-free batches are switched by "
                            "`padding_free`)")
