"""Attention over a padding-free row, one example (segment) at a time: exact isolation, no (T, T) mask.

A padding-free row holds several examples end to end. With `sdpa` or `eager` and a (T, T) block-diagonal mask,
the kernel still computes every query against every key of the row and throws most of it away, and on CPU
PyTorch's masked flash kernel is slow at these sizes. Here each example gets causal attention over its own
tokens only, so the work is sum(n_i^2) instead of T^2 and no mask is built or read.

`SegmentAttention` is a memory-lean autograd function (FlashAttention's recipe, with batched matmuls):

- forward, per example: scores = (Q * scale) K^T (grouped-query heads share their K/V, nothing is repeated),
  a causal -inf bias, fp32 softmax, out = P V; it keeps Q, K, V and O, not the (n, n) probabilities;
- backward recomputes P the same way: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
  dQ = dS K * scale, dK = dS^T (Q * scale).

Under autocast the matmuls run in the autocast dtype (as `sdpa` does) with the softmax in fp32; without it,
in the inputs' dtype. `tests/test_batching.py` checks outputs and gradients against `sdpa` per example.

The model reaches it through transformers' attention registry: `segments_attention(model)` switches the model's
attention implementation to `ATTENTION_NAME` for one forward, and the row's example boundaries travel as the
standard packed-sequence keyword `cu_seq_lens_q` (cumulative lengths, as FlashAttention varlen takes them).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

ATTENTION_NAME = "finetune_segments"


def segment_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                              scaling: float | None = None, cu_seq_lens_q=None, **kwargs):
    """transformers attention-interface signature. query (1, H, T, D), key/value (1, KV, T, D) → ((1, T, H, D), None)."""
    if cu_seq_lens_q is None:
        raise ValueError(f"`{ATTENTION_NAME}` attention needs `cu_seq_lens_q` (the packed row's example boundaries)")
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"`{ATTENTION_NAME}` attention takes one packed row without a KV cache, "
                         f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
    if dropout:
        raise ValueError(f"`{ATTENTION_NAME}` attention has no attention dropout; this model uses {dropout}")
    # plain causal softmax attention only: anything else the model asks for makes the caller use a mask instead
    unsupported = [name for name in ("softcap", "sliding_window", "s_aux", "position_bias") if kwargs.get(name) is not None]
    if unsupported or getattr(module, "is_causal", True) is False:
        raise ValueError(f"`{ATTENTION_NAME}` attention is plain causal attention; this model also needs "
                         f"{', '.join(unsupported) or 'non-causal attention'}")
    lengths = tuple(int(n) for n in torch.diff(cu_seq_lens_q.to("cpu")).tolist())
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    out = SegmentAttention.apply(query, key, value, lengths, scale, dtype)
    return out.transpose(1, 2).contiguous(), None


BLOCK_ROWS = 128  # queries per block: a block's keys stop at its last query, so the upper triangle is skipped


class SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, lengths, scale, dtype):
        _, heads, total, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        # (KV, g, T, D): the query heads that share a key/value head side by side; the scale folded into Q once
        q = (query[0] * scale).to(dtype).view(kv_heads, groups, total, dim)
        k, v = key[0].to(dtype)[:, None], value[0].to(dtype)[:, None]  # (KV, 1, T, D): broadcast over the group
        out = torch.empty_like(q)
        with torch.autocast(query.device.type, enabled=False):
            for rows, keys in _blocks(lengths):
                probs = _probabilities(q[:, :, rows], k[:, :, keys], rows.start - keys.start)
                out[:, :, rows] = torch.matmul(probs.to(dtype), v[:, :, keys])
        ctx.save_for_backward(q, k, v, out)
        ctx.lengths, ctx.scale = lengths, scale
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        return out.view(1, heads, total, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        kv_heads, groups, total, dim = q.shape
        dtype = q.dtype
        d_out = grad_out[0].to(dtype).view(q.shape)  # (KV, g, T, D)
        # rowsum(P * dP) = rowsum(dO * O): (KV, g, T, 1), cheaper than over the (n, n) probabilities
        delta = (d_out.float() * out.float()).sum(-1, keepdim=True)
        dq = torch.empty_like(q)
        dk = torch.zeros(kv_heads, total, dim, dtype=torch.float32, device=q.device)  # summed over query blocks
        dv = torch.zeros_like(dk)
        for rows, keys in _blocks(ctx.lengths):
            n_rows, n_keys = rows.stop - rows.start, keys.stop - keys.start
            q_rows, d_rows = q[:, :, rows], d_out[:, :, rows]  # (KV, g, r, D)
            probs = _probabilities(q_rows, k[:, :, keys], rows.start - keys.start)  # recomputed, (KV, g, r, n) fp32
            # dV = P^T dO and dK = dS^T Q, contracted over the g query heads of each key/value head at once
            flat = (kv_heads, groups * n_rows, n_keys)
            dv[:, keys] += torch.bmm(probs.to(dtype).view(flat).transpose(1, 2),
                                     d_rows.reshape(kv_heads, groups * n_rows, dim)).float()
            d_scores = torch.matmul(d_rows, v[:, :, keys].transpose(-1, -2)).float()  # dP
            d_scores = d_scores.sub_(delta[:, :, rows]).mul_(probs).to(dtype)  # dS = P * (dP - delta)
            dq[:, :, rows] = torch.matmul(d_scores, k[:, :, keys])  # w.r.t. the scaled Q
            dk[:, keys] += torch.bmm(d_scores.view(flat).transpose(1, 2),
                                     q_rows.reshape(kv_heads, groups * n_rows, dim)).float()  # q is scaled
        (q_type, k_type, v_type) = ctx.dtypes
        dq = dq.view(1, kv_heads * groups, total, dim).to(q_type) * ctx.scale
        return dq, dk[None].to(k_type), dv[None].to(v_type), None, None, None


def _blocks(lengths) -> list[tuple[slice, slice]]:
    """(query rows, key columns) per block of each example: rows [a, b) see that example's keys up to b."""
    out, start = [], 0
    for n in lengths:
        for a in range(0, n, BLOCK_ROWS):
            b = min(a + BLOCK_ROWS, n)
            out.append((slice(start + a, start + b), slice(start, start + b)))
        start += n
    return out


def _probabilities(q_rows: torch.Tensor, k_cols: torch.Tensor, first_row: int) -> torch.Tensor:
    """Causal softmax(Q K^T) in fp32, (KV, g, r, n), for already-scaled queries at example positions
    [first_row, first_row + r) against the example's keys [0, n)."""
    scores = torch.matmul(q_rows, k_cols.transpose(-1, -2)).float()
    n_rows = scores.shape[-2]
    # keys before the block's first query are all visible; the block's own (r, r) square is causal
    scores[..., first_row:].add_(_causal_bias(n_rows, q_rows.device))
    return torch.softmax(scores, dim=-1)


@functools.lru_cache(maxsize=16)
def _causal_bias(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) fp32: 0 on and below the diagonal, -inf above (a key after the query)."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


@functools.cache
def register() -> None:
    """Make `ATTENTION_NAME` a valid attention implementation (once per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, segment_attention_forward)


@contextlib.contextmanager
def segments_attention(model):
    """Within: `model` (and its sub-configs) attend with `ATTENTION_NAME`. For one packed forward at a time."""
    register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
