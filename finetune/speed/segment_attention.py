"""Attention over a padding-free row, one example (segment) at a time: exact isolation, no (T, T) mask.

A padding-free row holds several examples end to end. With `sdpa` or `eager` and the (T, T) block-diagonal mask
transformers builds from the reset `position_ids`, the kernel still computes every query against every key of the
row and throws most of it away, and on CPU PyTorch's masked flash kernel is slow at these sizes. Here each example
gets causal attention over its own tokens only, so the work is sum(n_i^2) instead of T^2 and no mask is built or
read. It computes plain causal attention only: layers with a sliding window, soft-capping or sinks refuse it and
keep transformers' packed masks (exact for those; this kernel is measured on plain causal models only).

`SegmentAttention` is an autograd function on FlashAttention's recipe, with batched matmuls:

- forward, per block of an example's queries: scores = (Q * scale) K^T, a causal -inf bias, fp32 softmax,
  out = P V; it keeps Q, K, V and O;
- backward: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale, dK = dS^T (Q * scale).
  P is kept from the forward, in the matmul dtype, for examples of up to `KEEP_PROBABILITIES_UP_TO` tokens:
  faster backward for more saved memory (both measured in benchmarks/RESULTS.md). For longer examples, whose
  probabilities grow with the square of the length, backward recomputes P exactly as forward did. Either way dS
  uses P as rounded to the matmul dtype (under bf16 autocast, like the P V product), so the two paths give the
  same bits.

Grouped-query heads: Q is laid out (KV, T, g, D), so a block's rows of the g query heads that share a key/value
head form one (r * g, D) matrix, and every product is one batched matmul over the KV heads with nothing repeated
or broadcast (a broadcast K would be copied g times per block).

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
    """transformers attention-interface signature.

    query (1, H, T, D), key/value (1, KV, T, D) → ((1, T, H, D), None).
    """
    if cu_seq_lens_q is None:
        raise ValueError(f"`{ATTENTION_NAME}` attention needs `cu_seq_lens_q` (the packed row's example boundaries)")
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"`{ATTENTION_NAME}` attention takes one packed row without a KV cache, "
                         f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
    if dropout:
        raise ValueError(f"`{ATTENTION_NAME}` attention has no attention dropout; this model uses {dropout}")
    # plain causal softmax attention only: anything else the model asks for makes the caller use
    # transformers' packed masks instead (exact for windows and soft-capping; ours is measured on plain causal)
    unsupported = [name for name in ("softcap", "sliding_window", "s_aux", "position_bias")
                   if kwargs.get(name) is not None]
    if unsupported or getattr(module, "is_causal", True) is False:
        raise ValueError(f"`{ATTENTION_NAME}` attention is plain causal attention; this model also needs "
                         f"{', '.join(unsupported) or 'non-causal attention'}")
    lengths = tuple(int(n) for n in torch.diff(cu_seq_lens_q.to("cpu")).tolist())
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return SegmentAttention.apply(query, key, value, lengths, scale, dtype), None


BLOCK_ROWS = 128  # queries per block: a block's keys stop at its last query, so the upper triangle is skipped
KEEP_PROBABILITIES_UP_TO = 512  # example length (tokens) up to which forward keeps P for backward


class SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, lengths, scale, dtype):
        _, heads, total, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        # (KV, T, g, D), the scale folded in once: a block's rows are then one (r * g, D) matrix per KV head
        q = torch.empty(kv_heads, total, groups, dim, dtype=dtype, device=query.device)
        torch.mul(query[0].view(kv_heads, groups, total, dim).transpose(1, 2), scale, out=q)
        k, v = key[0].to(dtype).contiguous(), value[0].to(dtype).contiguous()  # (KV, T, D)
        out = torch.empty(total, kv_heads, groups, dim, dtype=dtype, device=query.device)  # the caller's layout
        blocks_out = out.permute(1, 0, 2, 3)  # (KV, T, g, D) view
        kept = []  # P in `dtype`, for the blocks whose example is short enough
        with torch.autocast(query.device.type, enabled=False):
            for rows, keys, keep in _blocks(lengths):
                n_rows = rows.stop - rows.start
                probs = _probabilities(q[:, rows].view(kv_heads, n_rows * groups, dim), k[:, keys],
                                       rows.start - keys.start, n_rows).to(dtype)
                blocks_out[:, rows] = torch.bmm(probs, v[:, keys]).view(kv_heads, n_rows, groups, dim)
                if keep:
                    kept.append(probs)
        ctx.save_for_backward(q, k, v, out, *kept)
        ctx.lengths, ctx.scale = lengths, scale
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        return out.view(1, total, heads, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *kept = ctx.saved_tensors
        kv_heads, total, groups, dim = q.shape
        dtype = q.dtype
        # rowsum(P * dP) = rowsum(dO * O), per query row and head: cheaper than over the (n, n) probabilities
        delta = (grad_out[0].float() * out.view(total, kv_heads * groups, dim).float()).sum(-1)  # (T, H)
        delta = delta.view(total, kv_heads, groups).permute(1, 0, 2).reshape(kv_heads, total * groups, 1)
        d_out = torch.empty_like(q)  # (KV, T, g, D), as Q
        d_out.copy_(grad_out[0].reshape(total, kv_heads, groups, dim).permute(1, 0, 2, 3))
        dq = torch.empty(total, kv_heads, groups, dim, dtype=dtype, device=q.device)  # the query's own layout
        blocks_dq = dq.permute(1, 0, 2, 3)
        dk = torch.zeros(kv_heads, total, dim, dtype=torch.float32, device=q.device)  # summed over query blocks
        dv = torch.zeros_like(dk)
        kept = iter(kept)
        for rows, keys, keep in _blocks(ctx.lengths):
            n_rows = rows.stop - rows.start
            flat = (kv_heads, n_rows * groups, dim)
            q_rows, d_rows = q[:, rows].view(flat), d_out[:, rows].view(flat)
            if keep:
                probs = next(kept)
            else:  # recomputed as forward computed it
                probs = _probabilities(q_rows, k[:, keys], rows.start - keys.start, n_rows).to(dtype)
            dv[:, keys] += torch.bmm(probs.transpose(1, 2), d_rows).float()
            probs = probs.float()
            d_scores = torch.bmm(d_rows, v[:, keys].transpose(1, 2)).float()  # dP
            d_scores = d_scores.sub_(delta[:, rows.start * groups:rows.stop * groups]).mul_(probs).to(dtype)  # dS
            blocks_dq[:, rows] = torch.bmm(d_scores, k[:, keys]).view(kv_heads, n_rows, groups, dim)  # scaled Q
            dk[:, keys] += torch.bmm(d_scores.transpose(1, 2), q_rows).float()  # q is scaled
        (q_type, k_type, v_type) = ctx.dtypes
        dq = torch.mul(dq, ctx.scale).to(q_type).view(1, total, kv_heads * groups, dim).transpose(1, 2)
        return dq, dk[None].to(k_type), dv[None].to(v_type), None, None, None


def _blocks(lengths) -> list[tuple[slice, slice, bool]]:
    """(query rows, key columns, keep P) per block of each example: rows [a, b) see that example's keys up to b."""
    out, start = [], 0
    for n in lengths:
        keep = n <= KEEP_PROBABILITIES_UP_TO
        for a in range(0, n, BLOCK_ROWS):
            b = min(a + BLOCK_ROWS, n)
            out.append((slice(start + a, start + b), slice(start, start + b), keep))
        start += n
    return out


def _probabilities(q_rows: torch.Tensor, k_cols: torch.Tensor, first_row: int, n_rows: int) -> torch.Tensor:
    """Causal softmax(Q K^T) in fp32, (KV, r * g, n), for already-scaled queries (KV, r * g, D) (r rows of g heads
    each, at example positions [first_row, first_row + r)) against the example's keys (KV, n, D)."""
    scores = torch.bmm(q_rows, k_cols.transpose(1, 2)).float()
    kv_heads, rows_by_heads, n_keys = scores.shape
    # keys before the block's first query are all visible; the block's own (r, r) square is causal
    scores.view(kv_heads, n_rows, rows_by_heads // n_rows, n_keys)[..., first_row:].add_(
        _causal_bias(n_rows, q_rows.device)[:, None])
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
