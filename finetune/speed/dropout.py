"""Dropout on CPU with NumPy's generator: the same distribution as `nn.Dropout`, drawn faster.

On CPUs that are not Intel's, PyTorch draws dropout masks with a serial Mersenne Twister, one element at a time
(its MKL path is enabled for Intel CPUs only). LoRA puts a dropout in front of every adapted layer, on the layer's
whole input, so those draws are a measurable share of a CPU training step (benchmarks/RESULTS.md).

`cpu_dropout(model)` makes the model's `nn.Dropout` layers draw with NumPy's SFC64 generator instead, seeded from
PyTorch's own generator at each call, so `torch.manual_seed` and the RNG states that Trainer saves in checkpoints
still decide every mask. What each layer computes is unchanged: each element is dropped with probability p,
independently of all others, and kept elements are scaled by 1 / (1 - p), computed as PyTorch computes it. The
masks are other draws than PyTorch's, as any other seed would give.

- p <= 1/4 (LoRA's usual 0.05-0.1): the positions to drop are drawn as Geometric(p) gaps, about p * n draws
  instead of n; the output is x scaled, with those positions zeroed; backward keeps only the positions.
- larger p: one 32-bit draw per element against round(p * 2^32); backward keeps a bool mask, a quarter of the
  float mask PyTorch keeps.

Only CPU tensors in training mode take this path; CUDA's dropout is already a fused Philox kernel.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from . import replaced_forwards

SPARSE_UP_TO = 0.25  # drop probabilities up to this draw the positions to drop; above, one 32-bit draw per element


def _generator() -> np.random.Generator:
    """A NumPy generator seeded from torch's default generator (one draw from it per call)."""
    return np.random.Generator(np.random.SFC64(int(torch.randint(0, 2**62, ()))))


def drop_positions(n: int, p: float) -> torch.Tensor:
    """Sorted int64 positions in [0, n) to drop, each position independently with probability p.

    The gaps between successive drops of a Bernoulli(p) sequence are independent Geometric(p) variables, so drawing
    them gives the same distribution as one draw per element with about p * n draws instead of n (p = 0.05: 20x
    fewer)."""
    rng = _generator()
    expected = n * p
    size = int(expected + 6 * math.sqrt(expected) + 16)
    rate = -math.log1p(-p)

    def gaps() -> np.ndarray:  # Geometric(p) as ceil(Exp(1) / -log(1 - p)), NumPy's own method, vectorised
        return np.maximum(np.ceil(rng.standard_exponential(size) / rate), 1).astype(np.int64)

    ends = np.cumsum(gaps())  # 1-based positions of successive drops
    while ends[-1] < n:  # more than 6 standard deviations past the mean: rare
        ends = np.concatenate([ends, ends[-1] + np.cumsum(gaps())])
    return torch.from_numpy(ends[:np.searchsorted(ends, n, side="right")] - 1)


def keep_mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Bool (shape): True with probability 1 - p, independently per element (one 32-bit draw each)."""
    n = math.prod(shape)
    bits = _generator().bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]  # n uniform 32-bit integers
    threshold = np.uint32(min(round(p * 2**32), 2**32 - 1))
    return torch.from_numpy(bits >= threshold).view(shape)


def dropped(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Bool (shape), True where `dropout` drops, drawn exactly as `dropout` draws it (same seed, same result)."""
    if p <= SPARSE_UP_TO:
        mask = torch.zeros(math.prod(shape), dtype=torch.bool)
        mask[drop_positions(mask.numel(), p)] = True
        return mask.view(shape)
    return ~keep_mask(shape, p)


class _Dropout(torch.autograd.Function):
    """out = x * noise and dx = grad * noise, with nn.Dropout's noise: 0 where dropped, 1 / (1 - p) elsewhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        scale = torch.ones((), dtype=x.dtype).div_(1 - p)  # as nn.Dropout computes it: 1 / (1 - p) in x's dtype
        if p <= SPARSE_UP_TO:  # scale everything, then zero the few dropped positions; keep only those positions
            positions = drop_positions(x.numel(), p)
            out = (x * scale).contiguous()
            out.view(-1).index_fill_(0, positions, 0.0)
            ctx.save_for_backward(positions, scale)
            ctx.sparse = True
            return out
        keep = keep_mask(tuple(x.shape), p)
        ctx.save_for_backward(keep, scale)
        ctx.sparse = False
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        which, scale = ctx.saved_tensors
        if ctx.sparse:
            grad_x = (grad * scale).contiguous()
            grad_x.view(-1).index_fill_(0, which, 0.0)
            return grad_x, None
        return torch.where(which, grad * scale, 0.0), None


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
    with replaced_forwards(layers, _forward) as changed:
        yield changed
