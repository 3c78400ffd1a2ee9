"""Weight-major linear layers for batched decoding (finetune/speed/decode_linears.py): F.linear's values, the same
greedy answers, on the stock path where the product isn't measured."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from conftest import perturb_lora_b
from finetune.inference import BASE_ROW
from finetune.speed import decode_linears
from finetune.speed.decode_linears import MAX_ROWS, stock_path_reason, weight_major_linear, weight_major_linears
from real_models import real_tokenizer, save_tiny_model, tiny_model

RELATIVE_TOLERANCE = 1e-5  # of the largest |value|: fp32 sums taken in another order


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [2, 3, 8])
def test_weight_major_product_equals_f_linear(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(320, 96, generator=generator)
    b = torch.randn(320, generator=generator) if bias else None
    x = torch.randn(rows, 1, 96, generator=generator)  # (B, T=1, K): a decoding step's hidden states
    out = weight_major_linear(x, weight, b)
    assert out.shape == (rows, 1, 320) and out.is_contiguous()
    assert relative_error(out, F.linear(x, weight, b)) <= RELATIVE_TOLERANCE


def test_layers_take_the_weight_major_product_for_a_few_rows_only_inside_the_block():
    model = tiny_model("qwen2")  # q/k/v projections with a bias
    layer = model.model.layers[0].self_attn.q_proj
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    generator = torch.Generator().manual_seed(0)
    few, one, many = (torch.randn(n, 1, layer.in_features, generator=generator) for n in (2, 1, MAX_ROWS + 1))
    with torch.inference_mode():
        with weight_major_linears(model) as switched:
            inside = [layer(x) for x in (few, one, many)]
        assert switched == len(linears) == 2 * 7 + 1  # per layer q, k, v, o, gate, up, down; and the LM head
        assert torch.equal(inside[0], weight_major_linear(few, layer.weight, layer.bias))
        assert all(torch.equal(out, F.linear(x, layer.weight, layer.bias)) for out, x in zip(inside[1:], (one, many)))
    assert not any("forward" in vars(m) for m in linears)  # back to nn.Linear.forward


def lora_model(family: str = "llama"):
    """A tiny model with a LoRA adapter whose B matrices are non-zero, so that adapter on and off differ."""
    tokenizer = real_tokenizer(family)
    model = get_peft_model(tiny_model(family, tokenizer), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                                      target_modules=["q_proj", "v_proj"]))
    perturb_lora_b(model, seed=0, std=0.5)
    return model.eval(), tokenizer


def mixed_greedy(model, tokenizer, texts: list[str], new_tokens: int = 12):
    """Row 0 without the adapter, row 1 with it, greedy: (token ids, per-step logits (steps, B, V))."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(**batch, adapter_names=[BASE_ROW, "default"], do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_greedy_decoding_gives_the_stock_logits_and_answers(family):
    model, tokenizer = lora_model(family)
    texts = ["What is the capital of France?", "Name three colours, please."]  # different lengths: left padding
    stock_ids, stock_logits = mixed_greedy(model, tokenizer, texts)
    with weight_major_linears(model):
        ids, logits = mixed_greedy(model, tokenizer, texts)
    assert torch.equal(ids, stock_ids)
    assert relative_error(logits, stock_logits) <= RELATIVE_TOLERANCE
    assert not torch.equal(stock_ids[0, -12:], stock_ids[1, -12:])  # the adapter changes the answer


def test_models_it_is_not_measured_on_stay_on_the_stock_path(tmp_path, caplog):
    from finetune.models import load_base_model

    folder = save_tiny_model(tmp_path / "llama", "llama")
    assert stock_path_reason(load_base_model(str(folder), precision="fp32")) is None
    quantised = load_base_model(str(folder), load_in_4bit=True, precision="fp32")
    half = tiny_model("llama", dtype=torch.bfloat16)  # as `load_base_model` loads bf16 on a GPU
    on_meta = tiny_model("llama").to("meta")  # as on a GPU: not the CPU the product is measured on
    assert stock_path_reason(quantised) == "the model is quantised (4-bit); its layers run bitsandbytes' kernels"
    assert stock_path_reason(half) == ("the model has no fp32 linear layers (weights in torch.bfloat16); "
                                       "measured for fp32 only")
    assert stock_path_reason(on_meta) == "the model is on meta; the weight-major product is measured on CPU only"
    with weight_major_linears(quantised) as switched:
        assert switched == 0 and not any("forward" in vars(m) for m in quantised.modules())
    with caplog.at_level(logging.INFO, logger="finetune.speed.decode_linears"):
        decode_linears.log_stock_path(quantised)
    assert caplog.messages == ["batched decoding uses PyTorch's stock linear layers: the model is quantised (4-bit); "
                               "its layers run bitsandbytes' kernels"]
