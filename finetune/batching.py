"""Padding-free batches: a micro-batch's examples laid end to end in one row, each attending only to itself.

Padding a batch to its longest example spends compute on pad tokens. Concatenating the examples into
one row of `sum(lengths)` tokens spends none, but only stays the same computation if no example
attends to another one. How that is guaranteed depends on the attention kernel:

- `sdpa` / `eager`: a 4D block-diagonal causal mask (1, 1, T, T). transformers passes a 4D mask
  through unchanged. (Reset `position_ids` alone are NOT enough on CPU: with a KV cache object, or
  through other code paths, transformers builds a plain causal mask over the whole row and the second
  example sees the first.) `sdpa` takes a bool mask (True = may attend); `eager` adds the mask to the
  scores, so it gets a float one (0 = may attend, dtype-min = blocked).
- FlashAttention (`flash_attention_2/3`): no mask; per-example `position_ids` select its varlen path.
- On CPU, `sdpa`/`eager` models use `segments` instead (finetune/segment_attention.py): causal attention per
  example from the row's boundaries (`cu_seq_lens_q`), no (T, T) mask and no work across examples. Same result
  as the masked kernel, ~2x faster attention there.

Labels are shifted here (`shift_labels[i]` is the target predicted at position i) and each example's
last position gets IGNORE_INDEX, so no position predicts the first token of the next example.
Position ids restart at 0 for each example, so rotary embeddings see what they see unpacked.

`padding_free_mode(model)` picks the mode and *checks on the model itself* that a packed row gives the
logits of the examples run alone; models where it can't be verified (recurrent/state-space layers,
custom attention) train on padded batches instead.
"""

from __future__ import annotations

import logging

import torch

from .templates import IGNORE_INDEX

log = logging.getLogger(__name__)

MASK_MODES = {"sdpa": "bool_mask", "eager": "float_mask"}
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
MODES = ("bool_mask", "float_mask", "position_ids", "segments")


def shifted(labels: list[int]) -> list[int]:
    """Targets by position: position i predicts labels[i + 1]; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE_INDEX]


def block_causal_mask(lengths: list[int], *, float_mask: bool = False) -> torch.Tensor:
    """(1, 1, T, T) mask for examples of `lengths` laid end to end: causal within an example, blocked across.

    Bool: True where a query may attend to a key (sdpa). Float: 0 there and float32-min elsewhere (eager adds
    it to the scores; float32 so it stays finite whatever dtype the scores are promoted from).
    """
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (T,) example index
    total = int(segment.numel())
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    allowed = (segment[:, None] == segment[None, :]) & causal  # (T, T)
    if not float_mask:
        return allowed[None, None]
    mask = torch.zeros(total, total, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[None, None]


class PaddingFreeCollator:
    """`{"input_ids", "labels"}` features → one row: input_ids, position_ids, shift_labels (1, T) [+ 4D mask]."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown padding-free mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        batch = {
            "input_ids": torch.tensor([t for f in features for t in f["input_ids"]])[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "shift_labels": torch.tensor([t for f in features for t in shifted(f["labels"])])[None],
        }
        if self.mode == "segments":  # example boundaries, as FlashAttention varlen takes them
            batch["cu_seq_lens_q"] = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        elif self.mode != "position_ids":
            batch["attention_mask"] = block_causal_mask(lengths, float_mask=self.mode == "float_mask")
        return batch


class PaddedCollator:
    """Right-padded rows: input_ids, attention_mask (B, L) and shift_labels (B, L) with IGNORE_INDEX on pads."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def row(values: list[int], fill: int) -> list[int]:
            return list(values) + [fill] * (width - len(values))

        return {
            "input_ids": torch.tensor([row(f["input_ids"], self.pad_token_id) for f in features]),
            "attention_mask": torch.tensor([row([1] * len(f["input_ids"]), 0) for f in features]),
            "shift_labels": torch.tensor([row(shifted(f["labels"]), IGNORE_INDEX) for f in features]),
        }


# ----------------------------------------------------------------------------- choosing, with a check
def padding_free_mode(model) -> str | None:
    """The padding-free mode for this model's attention, or None when packed examples can't be isolated.

    The decision is verified on the model: two short random examples run packed must give the logits they give
    alone. Recurrent or convolutional layers (which carry state across the row whatever the mask says) and
    custom attention fail this and get None.
    """
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    mode = MASK_MODES.get(impl) or ("position_ids" if impl in VARLEN_IMPLEMENTATIONS else None)
    if mode is None:
        log.info("padding-free batches are off: attention `%s` has no known way to isolate packed examples", impl)
        return None
    on_cpu = next(model.parameters()).device.type == "cpu"
    if mode in MASK_MODES.values() and on_cpu and not getattr(model.config, "attention_dropout", 0.0):
        try:  # per-example attention: faster than a (T, T) mask on CPU; the same check decides
            if packed_logits_match(model, "segments"):
                return "segments"
        except (TypeError, ValueError, RuntimeError, KeyError) as e:
            log.info("per-example attention is off (%s: %s); using a block-diagonal mask", type(e).__name__, e)
    try:
        isolated = packed_logits_match(model, mode)
    except (TypeError, ValueError, RuntimeError) as e:  # a model whose forward rejects position_ids or a 4D mask
        log.info("padding-free batches are off: a packed forward pass failed (%s: %s)", type(e).__name__, e)
        return None
    if not isolated:
        log.warning("padding-free batches are off: packed examples change each other's logits on this model")
        return None
    return mode


@torch.no_grad()
def packed_logits_match(model, mode: str, lengths: tuple[int, int] = (7, 5)) -> bool:
    """Whether the second of two packed examples gets the logits it gets alone.

    "Match" is relative to a deliberately leaky run of the same row (plain causal mask): the packed error must be
    under a tenth of the leak. That holds in fp32 (error ~1e-6) and in bf16 (rounding ≪ leak), and fails when the
    mask is ignored (error = leak).
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(vocab, (n,), generator=generator) for n in lengths)
    was_training = model.training
    model.eval()
    try:
        alone = _logits(model, {"input_ids": second[None]}, device)
        packed = _logits(model, PaddingFreeCollator(mode)([{"input_ids": first.tolist(), "labels": first.tolist()},
                                                           {"input_ids": second.tolist(),
                                                            "labels": second.tolist()}]), device)
        row = torch.cat([first, second])[None]
        leaky = _logits(model, {"input_ids": row, "attention_mask": torch.ones_like(row)}, device)
    finally:
        model.train(was_training)
    tail = slice(lengths[0], None)
    error = (packed[tail] - alone).abs().max().item()
    leak = (leaky[tail] - alone).abs().max().item()
    log.debug("packed-isolation check (%s): error %.3g, leak %.3g", mode, error, leak)
    return error < 0.1 * leak


def _logits(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in batch.items() if k != "shift_labels"}
    return forward(model, batch).logits[0].float()  # (T, V)


def forward(model, inputs: dict[str, torch.Tensor], **kwargs):
    """`model(**inputs, use_cache=False)`; a `segments` batch runs with per-example attention."""
    if "cu_seq_lens_q" not in inputs:
        return model(**inputs, use_cache=False, **kwargs)
    from .segment_attention import segments_attention

    with segments_attention(getattr(model, "module", model)):  # DDP keeps the model (and its config) in .module
        return model(**inputs, use_cache=False, **kwargs)
