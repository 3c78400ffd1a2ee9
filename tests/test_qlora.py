"""QLoRA on a CPU: evaluations before and between training steps leave the LoRA gradients exact.

On a CPU with AVX512-bf16, bitsandbytes repacks a 4-bit layer for inference on its first eval-mode forward without
gradients, and its matmul has no autograd after that: Qwen2 (q/k/v bias) crashed in training, Llama (no bias)
trained on wrong LoRA gradients. The references: the same adapters on a dequantised fp32 copy of the base, and
the same 4-bit model run without the evaluation.
On a CPU without AVX512-bf16, or on CUDA, there is no repack and these tests pass without the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.config import RunConfig
from finetune.train import _load_model, _peft_config, train
from real_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2", "llama")  # q/k/v projections with a bias, and without
# Relative error (of the gradient's norm) allowed against a reference: bitsandbytes' backward is the dequantised
# weight's fp32 matmul, so the gradients agree to fp32 rounding (they are bit-identical here); the repack put the
# lower layers' gradients tens of percent off.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {family: save_tiny_model(root / family, family) for family in FAMILIES}


def qlora_model(folder: Path):
    """The tiny base in 4-bit with LoRA on every linear layer, built as `train()` builds it (fp32 compute)."""
    from peft import get_peft_model

    config = RunConfig(base_model=str(folder), method="qlora", precision="fp32", lora_dropout=0.0)
    torch.manual_seed(0)
    model = get_peft_model(_load_model(config, str(folder), "fp32"), _peft_config(config))
    # lora_B starts at zero; seeded values make every adapter's gradient depend on the layers above it
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def with_dequantised_base(model):
    """`model` with each 4-bit base layer swapped for an fp32 `Linear` holding its dequantised weight: plain torch
    autograd, nothing for an evaluation to repack."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    for module in list(model.modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(base, bnb.nn.Linear4bit):
            plain = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            plain.weight.data = dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            if base.bias is not None:
                plain.bias.data = base.bias.data.float()
            module.base_layer = plain.requires_grad_(False)
    return model


def a_batch(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0)).to(model.device)
    return {"input_ids": ids, "labels": ids}


def evaluate(model, batch) -> None:
    """What `Trainer.evaluate` does to the model: eval mode, a forward without gradients, back to training."""
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def sgd_step(model, lr: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= lr * p.grad


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    assert any(".layers.0." in name for name in want), "the lowest layer's adapters are compared"
    assert all(g.norm() > 0 for g in want.values()), "every adapter gets a gradient in the reference"
    off = {name: f"{((got[name] - g).norm() / g.norm()).item():.3g}" for name, g in want.items()
           if (got[name] - g).norm() > TOLERANCE * g.norm()}
    assert not off, f"LoRA gradients off the reference (relative error): {off}"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_after_a_pretraining_evaluation_equal_a_dequantised_base(base_folders, family):
    reference = with_dequantised_base(qlora_model(base_folders[family]))
    want = lora_gradients(reference, a_batch(reference))

    model = qlora_model(base_folders[family])
    evaluate(model, a_batch(model))
    assert_same_gradients(lora_gradients(model, a_batch(model)), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_after_an_evaluation_between_steps_equal_those_without(base_folders, family):
    reference, model = qlora_model(base_folders[family]), qlora_model(base_folders[family])
    batch = a_batch(model)
    for m in (reference, model):
        lora_gradients(m, batch)
        sgd_step(m)
    evaluate(model, batch)
    assert_same_gradients(lora_gradients(model, batch), lora_gradients(reference, batch))


def test_qlora_train_with_evaluations_completes_on_a_biased_model(base_folders, tmp_path):
    """`train()` on Qwen2 (q/k/v bias) in 4-bit evaluates the test row before training and the validation row
    twice during it. Six rows: one test, one validation, and four that every step trains on, so the loss falls."""
    lines = (ROOT / "examples/data/python_qa.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    config = RunConfig(base_model=str(base_folders["qwen2"]), method="qlora", learning_rate=1e-2,
                       lr_scheduler_type="constant", warmup_ratio=0.0, max_steps=6, eval_steps=3, logging_steps=1,
                       batch_size=4, gradient_accumulation_steps=1, max_seq_length=48, output_dir=str(tmp_path / "run"))
    result = train(config, rows=[json.loads(line) for line in lines])
    r = result.results
    assert r["status"] == "finished" and r["global_step"] == 6
    assert r["data"]["rows"] == {"train": 4, "validation": 1, "test": 1}
    assert r["test_loss_before"] > 0 and r["eval_loss"] > 0
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if rec["eval_loss"] is not None] == [3, 6]
    losses = [rec["loss"] for rec in records if rec["loss"] is not None]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.25, losses  # 12.01 → 11.51 here
