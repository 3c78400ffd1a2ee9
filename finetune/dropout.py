"""Dropout on CPU with a vectorised random-number generator: same distribution as `nn.Dropout`, a few times faster.

On CPUs that are not Intel's, PyTorch draws dropout masks with a serial Mersenne Twister, one element at a time
(its MKL path is enabled for Intel CPUs only). LoRA puts a dropout in front of every adapted layer, on the layer's
whole input, so that draw was 6-10% of a LoRA step on the benchmark machine (an AMD EPYC): 60 masks of T x 576
per micro-batch for SmolLM2-135M with LoRA on q_proj and v_proj.

`cpu_dropout(model)` makes the model's `nn.Dropout` layers draw their masks with NumPy's SFC64 generator instead,
seeded from PyTorch's own generator at each call (so `torch.manual_seed` and the RNG states that Trainer saves in
checkpoints still decide every mask). What each layer computes is unchanged: each element is kept with probability
1 - p (to within 2^-32, finer than PyTorch's 2^-24) independently of all others, and kept elements are scaled by
1 / (1 - p), computed as PyTorch computes it. The masks are other draws than PyTorch's, as any change of seed
would give. The mask kept for backward is a bool tensor, a quarter of the float mask PyTorch keeps.

Only CPU tensors in training mode take this path; CUDA's dropout is already a fused Philox kernel.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch


def keep_mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Bool (shape): True with probability 1 - p, independently per element; the seed is drawn from torch's RNG."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, ()))
    bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]  # n uniform 32-bit integers
    threshold = np.uint32(min(round(p * 2**32), 2**32 - 1))
    return torch.from_numpy(bits >= threshold).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(tuple(x.shape), p)
        scale = torch.ones((), dtype=x.dtype).div_(1 - p)  # as nn.Dropout computes it: 1 / (1 - p) in x's dtype
        ctx.save_for_backward(keep, scale)
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keep, scale = ctx.saved_tensors
        return torch.where(keep, grad * scale, 0.0), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` with the mask drawn as above on CPU; `F.dropout` itself elsewhere."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
        return torch.nn.functional.dropout(x, p, training)
    return _Dropout.apply(x, p)


def _forward(module: torch.nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return dropout(x, module.p, module.training)


@contextlib.contextmanager
def cpu_dropout(model: torch.nn.Module):
    """Within: the model's (non-inplace) `nn.Dropout` layers use `dropout` above. Yields how many layers changed."""
    layers = [m for m in model.modules() if type(m) is torch.nn.Dropout and not m.inplace and m.p > 0]
    for layer in layers:
        layer.forward = functools.partial(_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward
