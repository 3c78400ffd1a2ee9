"""CPU dropout with NumPy-drawn masks (finetune/speed/dropout.py): nn.Dropout's distribution and arithmetic."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune.models import load_base_model
from finetune.speed.dropout import cpu_dropout, dropout, dropped


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5])  # drop positions drawn as gaps; one draw per element
def test_each_element_is_dropped_with_probability_p_independently(p):
    torch.manual_seed(0)
    n = 1_000_000
    a, b = dropped((n,), p), dropped((n,), p)
    assert abs(a.double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    # two draws both drop a position p^2 of the time, not p
    assert abs((a & b).double().mean().item() - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    # neighbours are independent too: a drop is followed by a drop p of the time
    assert abs((a[1:] & a[:-1]).double().sum().item() / a[:-1].sum().item() - p) < 5 * (p * (1 - p) / (n * p)) ** 0.5
    # the first and the last positions are reachable
    assert any(dropped((10,), p)[0] for _ in range(200)) and any(dropped((10,), p)[-1] for _ in range(200))


def test_the_seed_comes_from_torch():
    torch.manual_seed(123)
    first = dropped((1000,), 0.1)
    torch.manual_seed(123)
    assert torch.equal(dropped((1000,), 0.1), first)
    assert not torch.equal(dropped((1000,), 0.1), first)  # the next draw is a new one


@pytest.mark.parametrize("p", [0.1, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_exactly_as_nn_dropout_scales_them(dtype, p):
    """out = x * noise and dx = g * noise, with nn.Dropout's noise = mask / (1 - p) in x's dtype, bit for bit."""
    x = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    upstream = torch.randn(64, 96, dtype=dtype)
    torch.manual_seed(7)
    out = dropout(x, p)
    out.backward(upstream)
    torch.manual_seed(7)
    noise = (~dropped((64, 96), p)).to(dtype).div_(1 - p)  # the same draw, as PyTorch's dropout forms its noise
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
