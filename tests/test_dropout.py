"""CPU dropout with NumPy-drawn masks (finetune/dropout.py): nn.Dropout's distribution and arithmetic."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune.dropout import cpu_dropout, dropout, keep_mask
from finetune.models import load_base_model


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_element_is_dropped_with_probability_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    dropped = (~keep_mask((n,), p)).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma
    # independent draws: two masks agree where both drop about p^2 of the time, not p
    a, b = ~keep_mask((n,), p), ~keep_mask((n,), p)
    assert abs((a & b).double().mean().item() - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    # the two 32-bit halves of each 64-bit draw are both used, and differ
    assert not torch.equal(a[0::2], a[1::2])


def test_the_seed_comes_from_torch():
    torch.manual_seed(123)
    first = keep_mask((1000,), 0.3)
    torch.manual_seed(123)
    assert torch.equal(keep_mask((1000,), 0.3), first)
    assert not torch.equal(keep_mask((1000,), 0.3), first)  # the next draw is a new one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_exactly_as_nn_dropout_scales_them(dtype):
    """out = x * noise and dx = g * noise, with nn.Dropout's noise = mask / (1 - p) in x's dtype, bit for bit."""
    p = 0.1
    x = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    upstream = torch.randn(64, 96, dtype=dtype)
    torch.manual_seed(7)
    out = dropout(x, p)
    out.backward(upstream)
    torch.manual_seed(7)
    noise = keep_mask((64, 96), p).to(dtype).div_(1 - p)  # the same draw, as PyTorch's dropout forms its noise
    assert out.dtype == dtype
    assert torch.equal(out, x.detach() * noise)
    assert torch.equal(x.grad, upstream * noise)
    assert 0 < (out == 0).sum() < out.numel()


def test_eval_mode_and_p_zero_change_nothing():
    x = torch.randn(8, 8)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))  # PyTorch's own dropout handles p = 1


def test_cpu_dropout_covers_the_lora_dropouts_and_then_restores_them(demo_model_dir):
    model = get_peft_model(load_base_model(str(demo_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"]))
    lora_dropouts = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert lora_dropouts and all(m.p == 0.2 for m in lora_dropouts)
    model.train()
    x = torch.randn(1, 5, model.config.hidden_size)
    with cpu_dropout(model) as changed:
        assert changed == len(lora_dropouts)
        torch.manual_seed(3)
        inside = lora_dropouts[0](x)
    assert all("forward" not in vars(m) for m in lora_dropouts)
    torch.manual_seed(3)
    assert torch.equal(inside, dropout(x, 0.2))
    torch.manual_seed(3)
    assert not torch.equal(lora_dropouts[0](x), inside)  # PyTorch's own draw again
