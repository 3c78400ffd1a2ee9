"""Linear layers for decoding a few rows at once on CPU: the same product, computed weight-major.

A batched decoding step (the compare view's two answers: one row each) multiplies a few rows by every weight of
the model. `F.linear(x, W)` with x (M, K) and W (N, K) asks the CPU's BLAS (MKL) for x W^T; for small M > 1 the
fp32 kernel it picks for that orientation costs about M one-row products, so a two-row step costs far more than
a one-row step although the weights, which dominate the memory traffic, are the same. The same product taken
weight-major, (W x^T)^T, gets a kernel whose two-row cost is about one row's. The values agree to fp32 rounding
(the same sums, added in another order), which `tests/test_generation_speed.py` checks on the logits and the
greedy answers. `python -m benchmarks.inference --steps` measures a decoding step both ways (RESULTS.md).

`weight_major_linears(model)` switches the model's plain fp32 `nn.Linear` layers (LoRA's base layers, LoRA A/B
and the LM head included) to it for the block, for inputs of 2 to `MAX_ROWS` rows; other inputs (one row, a
prompt's prefill) take `F.linear` as before. Where it is not measured, the model stays on the stock path and
`stock_path_reason` says why (logged once when `ChatModel` loads): a model on GPU, 4-bit quantised weights
(bitsandbytes' layers), half-precision weights (on CPU PyTorch runs those through oneDNN, not MKL).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from . import replaced_forwards

log = logging.getLogger(__name__)

MAX_ROWS = 2  # rows per product up to which the weight-major kernel is used: the compare view's; more not measured


def stock_path_reason(model: torch.nn.Module) -> str | None:
    """Why `weight_major_linears` leaves `model` as it is; None when it applies."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's transformers model
    devices = sorted({p.device.type for p in model.parameters()})
    if devices != ["cpu"]:
        return f"the model is on {', '.join(devices)}; the weight-major product is measured on CPU only"
    if getattr(base, "hf_quantizer", None) is not None:
        return "the model is quantised (4-bit); its layers run bitsandbytes' kernels"
    if not _fp32_linears(model):
        return f"the model has no fp32 linear layers (weights in {base.dtype}); measured for fp32 only"
    return None


def log_stock_path(model: torch.nn.Module) -> None:
    """Say once, when a model is loaded for generation, if its batched decoding stays on the stock path."""
    reason = stock_path_reason(model)
    if reason is not None:
        log.info("batched decoding uses PyTorch's stock linear layers: %s", reason)


@contextlib.contextmanager
def weight_major_linears(model: torch.nn.Module):
    """Within: the model's fp32 `nn.Linear` layers take inputs of 2 to `MAX_ROWS` rows weight-major (see above).

    Nothing changes where `stock_path_reason(model)` gives a reason. Yields the number of layers switched.
    """
    layers = [] if stock_path_reason(model) else _fp32_linears(model)
    with replaced_forwards(layers, _forward) as changed:
        yield changed


def weight_major_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as (W x^T)^T: x (..., K), weight (N, K) -> (..., N), contiguous."""
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    if bias is None:
        out = torch.mm(weight, rows.T)  # (N, M)
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, rows.T)  # (N, M)
    return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])


def _forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 2 <= rows <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
        return weight_major_linear(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def _fp32_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Plain `nn.Linear` layers with fp32 weights (subclasses, such as 4-bit layers, have their own forward)."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
