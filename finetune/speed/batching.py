"""Padding-free batches: a micro-batch's examples laid end to end in one row, each attending only to itself.

Padding a batch to its longest example spends compute on pad tokens. Concatenating the examples into one row of
`sum(lengths)` tokens spends none, and stays the same computation as long as no example attends to another one.
Two modes guarantee that:

- `position_ids` (the library's mechanism): position ids restart at 0 for each example and no attention mask is
  passed. transformers then builds each layer's own mask (causal or sliding-window) per example
  (`masking_utils.find_packed_sequence_indices`), and FlashAttention takes its varlen path. This needs a forward
  without a KV cache, which `forward` below guarantees.
- `segments` (ours, CPU only): per-example attention from the row's boundaries (`cu_seq_lens_q`), no (T, T) mask
  and no work across examples (segment_attention.py). It computes plain causal attention only, so models
  with sliding windows or soft-capping use `position_ids`.

Labels are shifted here (`shift_labels[i]` is the target predicted at position i) and each example's last position
gets IGNORE_INDEX, so no position predicts the first token of the next example. Position ids restart at 0 for each
example, so rotary embeddings see what they see unpacked.

`padding_free_mode(model)` picks the mode and *checks on the model itself* that a packed row gives the logits of the
examples run alone, with examples longer than the model's sliding window; models where it can't be verified
(recurrent/state-space layers, custom attention) train on padded batches instead.
"""

from __future__ import annotations

import logging

import torch

from ..templates import IGNORE_INDEX

log = logging.getLogger(__name__)

MODES = ("position_ids", "segments")


def shifted(labels: list[int]) -> list[int]:
    """Targets by position: position i predicts labels[i + 1]; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE_INDEX]


class PaddingFreeCollator:
    """`{"input_ids", "labels"}` features → one row: input_ids, position_ids, shift_labels (1, T) [+ cu_seq_lens_q].

    transformers' `DataCollatorWithFlattening` lays the row out (labels -100 at each example's first token); the
    loss reads targets by position, so they are shifted here once, across the row.
    """

    def __init__(self, mode: str):
        from transformers import DataCollatorWithFlattening

        if mode not in MODES:
            raise ValueError(f"unknown padding-free mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        self.flatten = DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_flash_attn_kwargs=True)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        row = self.flatten(features)
        labels = row["labels"]  # (1, T); the first position of every example is IGNORE_INDEX
        batch = {"input_ids": row["input_ids"], "position_ids": row["position_ids"],
                 "shift_labels": torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)}
        if self.mode == "segments":  # example boundaries, as FlashAttention varlen takes them
            batch["cu_seq_lens_q"] = row["cu_seq_lens_q"]
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
SEGMENT_KERNELS = ("sdpa", "eager")  # the attention implementations per-example attention stands in for, on CPU


def padding_free_mode(model, max_length: int | None = None, *, segments: bool = True) -> str | None:
    """The padding-free mode for this model, or None when packed examples can't be isolated (`segments`: may
    per-example attention be chosen).

    The decision is verified on the model: two random examples run packed must give the logits they give alone. They
    are longer than the model's sliding window when examples of `max_length` tokens (None: any length) can be, so a
    packing that ignores the window fails. Recurrent or convolutional layers (which carry state across the row
    whatever the mask says) and custom attention fail this and get None.
    """
    lengths = check_lengths(model, max_length)
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    on_cpu = next(model.parameters()).device.type == "cpu"
    if segments and impl in SEGMENT_KERNELS and on_cpu and not getattr(model.config, "attention_dropout", 0.0):
        try:  # per-example attention: faster than a (T, T) mask on CPU; the same check decides
            if packed_logits_match(model, PaddingFreeCollator("segments"), lengths):
                return "segments"
        except (TypeError, ValueError, RuntimeError, KeyError) as e:  # e.g. a sliding window or soft-capping
            log.info("per-example attention is off (%s: %s); using transformers' packed-sequence masks",
                     type(e).__name__, e)
    try:
        isolated = packed_logits_match(model, PaddingFreeCollator("position_ids"), lengths)
    except (TypeError, ValueError, RuntimeError) as e:  # a model whose forward rejects position_ids
        log.info("padding-free batches are off: a packed forward pass failed (%s: %s)", type(e).__name__, e)
        return None
    if not isolated:
        log.warning("padding-free batches are off: packed examples change each other's logits on this model")
        return None
    return "position_ids"


def sliding_window(model) -> int | None:
    """The sliding-window width (tokens a query sees, itself included) if any layer of the model attends through one."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def check_lengths(model, max_length: int | None = None) -> tuple[int, int]:
    """Lengths of the two examples the isolation check packs: longer than the window where examples can be."""
    window = sliding_window(model)
    if window is None or (max_length is not None and max_length <= window):
        return 7, 5
    return window + 7, window + 5


@torch.no_grad()
def packed_logits_match(model, collator, lengths: tuple[int, int] = (7, 5)) -> bool:
    """Whether the second of two packed examples (`collator` packs them) gets the logits it gets alone.

    "Match" is relative to a deliberately leaky run of the same row (plain causal mask): the packed error must be
    under a tenth of the leak. That holds in fp32 (error ~1e-6) and in bf16 (rounding ≪ leak), and fails when the
    mask is ignored (error = leak) or ignores a sliding window the examples exceed.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(vocab, (n,), generator=generator) for n in lengths)
    was_training = model.training
    model.eval()
    try:
        alone = _logits(model, {"input_ids": second[None]}, device)
        packed = _logits(model, collator([{"input_ids": first.tolist(), "labels": first.tolist()},
                                          {"input_ids": second.tolist(), "labels": second.tolist()}]), device)
        row = torch.cat([first, second])[None]
        leaky = _logits(model, {"input_ids": row, "attention_mask": torch.ones_like(row)}, device)
    finally:
        model.train(was_training)
    tail = slice(lengths[0], None)
    error = (packed[tail] - alone).abs().max().item()
    leak = (leaky[tail] - alone).abs().max().item()
    log.debug("packed-isolation check (%s, lengths %s): error %.3g, leak %.3g",
              getattr(collator, "mode", collator), lengths, error, leak)
    return error < 0.1 * leak


def _logits(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in batch.items() if k != "shift_labels"}
    return forward(model, batch).logits[0].float()  # (T, V)


def forward(model, inputs: dict[str, torch.Tensor], **kwargs):
    """`model(**inputs, use_cache=False)`: no cache, so transformers builds packed masks from `position_ids`; a
    `segments` batch runs with per-example attention."""
    if "cu_seq_lens_q" not in inputs:
        return model(**inputs, use_cache=False, **kwargs)
    from .segment_attention import segments_attention

    with segments_attention(getattr(model, "module", model)):  # DDP keeps the model (and its config) in .module
        return model(**inputs, use_cache=False, **kwargs)
