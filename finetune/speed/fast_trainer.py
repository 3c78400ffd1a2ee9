"""`FastSFTTrainer`: TRL's SFTTrainer with padding-free batches and an LM head run only where there is loss.

The loss is TRL's: the sum of next-token cross-entropies over target tokens (labels != -100) divided by
the number of target tokens in the whole accumulated batch (`num_items_in_batch`), so gradient
accumulation weighs every target token equally. What changes is how it is computed (the levers of
`finetune.speed`, each switchable with `levers_off`):

- training micro-batches are padding-free (`batching`) when the model passes the isolation check; evaluation
  keeps padded batches, so eval_loss is computed exactly as before;
- `target_head`: the vocabulary projection (the largest matmul for small models) runs only on positions that
  predict a target token, via the model's own `logits_to_keep` (which also applies any logit soft-capping);
- `chunked_loss`: the cross-entropy forms its gradient in the forward pass, chunk by chunk
  (`target_cross_entropy`), so no fp32 copy of the logits and no fp32 log-softmax are kept for backward;
- `half_frozen_weights`: while `train()` runs under bf16/fp16 autocast, frozen fp32 `nn.Linear` weights are
  stored in that half type (`frozen_linears_stored_in`): bit-identical arithmetic, less memory;
- `cpu_dropout`: on CPU, dropout masks (LoRA's dropout) are drawn with a vectorised generator (`dropout`);
- TRL's per-step entropy metric (a softmax over every position's full logits) is not computed;
  `mean_token_accuracy` is, on the target positions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from ..templates import IGNORE_INDEX
from . import LEVERS
from .batching import PaddedCollator, PaddingFreeCollator, forward, padding_free_mode
from .dropout import cpu_dropout

log = logging.getLogger(__name__)


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT wrapper takes `logits_to_keep` (most transformers 5 LMs do)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def target_logits(model, inputs: dict[str, torch.Tensor], keep: torch.Tensor, *, use_keep: bool) -> torch.Tensor:
    """(K, V) logits at the K positions where `keep` (B, T) is True; the head runs there only if `use_keep`."""
    if use_keep:
        logits = forward(model, inputs, logits_to_keep=keep).logits
        if logits.dim() == 2:  # the bool-mask slice flattens to (K, V)
            return logits
        return logits[keep]  # a model that took the argument but kept (B, T, V)
    return forward(model, inputs).logits[keep]


class TargetLoss(NamedTuple):
    loss: torch.Tensor  # float32 scalar
    logits: torch.Tensor  # (K, V) at the K target positions
    targets: torch.Tensor  # (K,)
    hits: torch.Tensor  # int64 scalar: targets whose logit is the highest of their row (ties count)


def target_token_loss(model, batch: dict[str, torch.Tensor], num_items_in_batch=None, *,
                      use_logits_to_keep: bool = True, chunked: bool = True,
                      grad_buffer: ReusedBuffer | None = None) -> TargetLoss:
    """Sum of cross-entropies over target tokens / `num_items_in_batch` (default: this batch's target count).

    `batch` is a collated batch with `shift_labels` (`batching`). `chunked`: `target_cross_entropy_and_hits`
    (else the plain `F.cross_entropy`, the `chunked_loss` lever off). `grad_buffer`: see `ReusedBuffer`.
    """
    inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
    targets = batch["shift_labels"]  # (B, T)
    keep = targets != IGNORE_INDEX
    logits = target_logits(model, inputs, keep, use_keep=use_logits_to_keep)  # (K, V)
    wanted = targets[keep]  # (K,)
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch
    divisor = torch.as_tensor(count, device=logits.device, dtype=torch.float32).clamp(min=1)
    if chunked:
        loss, hits = target_cross_entropy_and_hits(logits, wanted, divisor, grad_buffer=grad_buffer)
    else:
        loss = F.cross_entropy(logits.float(), wanted, reduction="sum") / divisor
        hits = (logits.detach().argmax(-1) == wanted).sum()
    return TargetLoss(loss, logits, wanted, hits)


def target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor, *,
                         chunk_rows: int = 32) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets, reduction="sum") / divisor`, and the same gradient, in less memory.

    logits (K, V) in any float dtype, targets (K,), divisor a float32 scalar; returns a float32 scalar.
    """
    return _TargetCrossEntropy.apply(logits, targets, divisor, chunk_rows, None)[0]


def target_cross_entropy_and_hits(logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor, *,
                                  chunk_rows: int = 32, grad_buffer: ReusedBuffer | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_cross_entropy`, and how many targets have the highest logit of their row (for token accuracy,
    counted in the same pass over the logits instead of a separate argmax over K x V)."""
    return _TargetCrossEntropy.apply(logits, targets, divisor, chunk_rows, grad_buffer)


class ReusedBuffer:
    """Memory for the cross-entropy's (K, V) gradient, reused by every micro-batch instead of allocated anew.

    On CPU a fresh tensor that size is a fresh memory mapping (glibc maps every block above 32 MB and unmaps it on
    free), and writing it faults in and zeroes every page (cost: benchmarks/RESULTS.md). For a caller whose
    backward of one loss finishes before the next loss is computed (Trainer's training_step); it grows to the
    largest gradient seen.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def take(self, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised tensor of `like`'s shape and device and `dtype` (default `like`'s), in the reused memory."""
        n = like.numel()
        dtype = dtype or like.dtype
        flat = self._flat
        if flat is None or flat.numel() < n or flat.dtype != dtype or flat.device != like.device:
            flat = self._flat = torch.empty(n + n // 4, dtype=dtype, device=like.device)  # room to grow
        return flat[:n].view(like.shape)


class _TargetCrossEntropy(torch.autograd.Function):
    """Cross-entropy whose gradient is formed in the forward pass, `chunk_rows` rows at a time.

    The plain computation keeps, at the top of the activation pile, an fp32 copy of the logits and the fp32
    log-softmax saved for backward (2 x K x V x 4 bytes), then builds an fp32 gradient of the same size in
    backward. Here only the gradient is kept, in the logits' own dtype (K x V x 2 bytes in bf16), plus one chunk's
    fp32 temporaries. The arithmetic is
    the same: softmax in fp32, minus one at the target, divided by `divisor`, cast once to the logits' dtype.

    fp16 logits keep an fp32 gradient (K x V x 4 bytes) and are cast only in backward, after the incoming gradient
    is applied, as the plain computation does: under fp16 mixed precision that gradient carries GradScaler's scale
    (2^16 at first), which fp16 itself overflows at (max 65504), and an unscaled gradient stored in fp16 flushes
    the small probabilities (below 2^-24) to zero before the scale could lift them.
    """

    @staticmethod
    def forward(ctx, logits, targets, divisor, chunk_rows, grad_buffer):
        needs_grad = ctx.needs_input_grad[0]
        count, vocab = logits.shape
        target_probs = torch.empty(count, dtype=torch.float32, device=logits.device)
        hits = torch.zeros((), dtype=torch.int64, device=logits.device)
        grad = None
        if needs_grad:
            grad_dtype = torch.float32 if logits.dtype == torch.float16 else logits.dtype  # see the docstring
            grad = (grad_buffer.take(logits, dtype=grad_dtype) if grad_buffer is not None
                    else torch.empty_like(logits, dtype=grad_dtype))
        # one chunk's fp32 logits and probabilities, reused by every chunk (fresh ones would be new pages each time)
        part_buffer = torch.empty(min(chunk_rows, count), vocab, dtype=torch.float32, device=logits.device)
        probs_buffer = torch.empty_like(part_buffer)
        for start in range(0, count, chunk_rows):
            stop = min(start + chunk_rows, count)
            part, probs = part_buffer[:stop - start], probs_buffer[:stop - start]
            part.copy_(logits[start:stop])  # (C, V) fp32
            wanted = targets[start:stop]  # (C,)
            rows = torch.arange(stop - start, device=wanted.device)
            hits += (part[rows, wanted] >= part.amax(dim=-1)).sum()
            torch.softmax(part, dim=-1, out=probs)  # one fused pass (log_softmax from bf16 is several times slower)
            target_probs[start:stop] = probs[rows, wanted]
            if needs_grad:  # d(sum of CE)/d(logits) = softmax - one-hot(target)
                probs[rows, wanted] -= 1.0
                grad[start:stop] = probs.div_(divisor)
        losses = -torch.log(target_probs)
        underflow = target_probs <= 1e-30  # p(target) below fp32's range (a loss above ~69): from the log-sum-exp
        if underflow.any():  # one check per call, not per chunk (each is a host-device sync on a GPU)
            part = logits[underflow].float()
            losses[underflow] = torch.logsumexp(part, dim=-1) - part.gather(1, targets[underflow, None]).squeeze(1)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(hits)
        return losses.sum() / divisor, hits

    @staticmethod
    def backward(ctx, grad_output, _grad_hits):
        (grad,) = ctx.saved_tensors
        dtype = ctx.logits_dtype
        # Trainer's backward passes exactly 1.0 (one process): skip a pass over K x V on CPU, where reading the
        # scalar costs nothing; on a GPU .item() would sync, so multiply there (x 1.0 is exact either way)
        if grad.device.type == "cpu" and grad_output.item() == 1.0:
            return grad.to(dtype), None, None, None, None
        if grad.dtype == dtype:
            return grad * grad_output.to(dtype), None, None, None, None
        # fp16 logits, fp32 gradient: scale in fp32 and round once, straight into the fp16 result
        return torch.mul(grad, grad_output, out=torch.empty_like(grad, dtype=dtype)), None, None, None, None


def frozen_linears(model) -> list[torch.nn.Linear]:
    """Plain `nn.Linear` layers whose fp32 weights (and bias) are frozen.

    Excluded: trainable layers (LoRA A/B, full fine-tuning) and subclasses with their own forward (4-bit layers).
    A weight shared with another kind of module (an LM head tied to the input embeddings) is included: the layer
    then gets its own half-precision copy while the embedding lookup keeps the fp32 original.
    """
    return [m for m in model.modules()
            if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


@contextlib.contextmanager
def frozen_linears_stored_in(model, dtype: torch.dtype):
    """While inside: `frozen_linears(model)` hold their weights (and biases) in `dtype`; fp32 again on the way out.

    Only for code that runs under autocast to `dtype`: autocast rounds fp32 linear weights to `dtype`
    (round-to-nearest-even, the same as `.to(dtype)`) at every forward and keeps the rounded copies for backward, so
    storing them rounded computes bit-identical results with half the weight memory and no per-forward cast. On the
    way out the weights are cast back to fp32: they then hold the rounded values the run computed with. A weight
    shared with a non-linear module (a tied LM head) is not rounded in place: inside, the layer's forward uses a
    rounded copy, and the shared fp32 weight is untouched.

    transformers maps the checkpoint file into memory and the weights are views of that map, which is released only
    when no tensor views it any more. So the other frozen fp32 weights (embeddings, norms) are copied out of it too:
    otherwise the fp32 pages would stay resident next to their bf16 copies (without the copy this saved nothing;
    benchmarks/RESULTS.md).
    """
    layers = frozen_linears(model)
    for p in model.parameters():  # out of the checkpoint's memory map (see above), before anything is converted
        if not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu":  # (GPU memory is not mapped)
            p.data = p.data.clone()
    shared = {p.data_ptr() for module in model.modules() if type(module) is not torch.nn.Linear
              for p in module.parameters(recurse=False)}
    tied = [layer for layer in layers if layer.weight.data_ptr() in shared]
    for layer in tied:  # the tied Parameter stays as it is (transformers re-ties a replaced one); the forward changes
        layer.forward = functools.partial(_linear, layer.weight.detach().to(dtype), layer.bias)
    converted = [layer for layer in layers if layer not in tied]
    for layer in converted:
        for p in layer.parameters(recurse=False):
            p.data = p.data.to(dtype)
    try:
        yield layers
    finally:
        for layer in tied:
            del layer.forward  # back to nn.Linear.forward with the shared fp32 weight
        for layer in converted:
            for p in layer.parameters(recurse=False):
                p.data = p.data.float()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def uses_dora(model) -> bool:
    """DoRA reads its base weights outside the autocast linear (the weight norm): they must stay fp32."""
    return any(getattr(cfg, "use_dora", False) for cfg in getattr(model, "peft_config", {}).values())


class FastSFTTrainer(SFTTrainer):
    """SFTTrainer whose dataset rows are `{"input_ids", "labels"}` (our encoding, labels -100 off-target).

    `padding_free`: pack training micro-batches where the model passes the isolation check. `levers_off`: names
    from `finetune.speed.LEVERS` to compute the plain way instead (the benchmark measures each one so).
    """

    def __init__(self, *args, padding_free: bool = True, levers_off=(), **kwargs):
        levers_off = set(levers_off or ())
        unknown = sorted(levers_off - set(LEVERS))
        if unknown:
            raise ValueError(f"unknown speed lever(s) {unknown}; choose from {', '.join(LEVERS)}")
        super().__init__(*args, **kwargs)
        self.levers = frozenset(LEVERS) - levers_off  # the levers pulled
        if self.args.gradient_checkpointing and "segments" in self.levers:
            # per-example attention saves for backward what its recomputation under checkpointing doesn't match
            log.info("per-example attention is off with gradient checkpointing; using transformers' packed masks")
            self.levers -= {"segments"}
        pad_id = self.processing_class.pad_token_id
        self.eval_collator = PaddedCollator(pad_id)
        self.batching = padding_free_mode(self.model, self.args.max_length,
                                          segments="segments" in self.levers) if padding_free else None
        self.data_collator = PaddingFreeCollator(self.batching) if self.batching else self.eval_collator
        self.use_logits_to_keep = "target_head" in self.levers and accepts_logits_to_keep(self.model)
        self.ce_grad_buffer = ReusedBuffer()
        # our compute_loss always divides by num_items_in_batch, so Trainer must count it and not rescale
        self.model_accepts_loss_kwargs = True

    def autocast_half_dtype(self) -> torch.dtype | None:
        """The half type `train()` autocasts to (bf16/fp16 mixed precision), or None."""
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    def train(self, *args, **kwargs):
        half = self.autocast_half_dtype()
        store_half = half is not None and not uses_dora(self.model) and "half_frozen_weights" in self.levers
        with contextlib.ExitStack() as stack:
            if store_half:
                stack.enter_context(frozen_linears_stored_in(self.model, half))
            if "cpu_dropout" in self.levers:  # LoRA's dropout masks, vectorised on CPU (`dropout`)
                stack.enter_context(cpu_dropout(self.model))
            return super().train(*args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples, device):
        """Target tokens in the whole accumulated batch, on every process: the loss is then a mean over all of
        them, not a mean of per-micro-batch (or per-process) means. Trainer counts only batches with `labels`;
        ours carry `shift_labels`."""
        n = sum((b["shift_labels"] != -100).sum() for b in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n.to(device)).sum()
        return n.to(device)

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        loss, logits, wanted, hits = target_token_loss(
            model, inputs, num_items_in_batch, use_logits_to_keep=self.use_logits_to_keep,
            chunked="chunked_loss" in self.levers,
            grad_buffer=self.ce_grad_buffer if mode == "train" else None)  # training_step: backward before the next
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every rank; DDP averages grads
        self._log_batch_metrics(mode, inputs, hits, wanted)
        return (loss, {"logits": logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None  # only the loss is ever evaluated: no logits gathered

    def _log_batch_metrics(self, mode: str, inputs: dict, hits: torch.Tensor, wanted: torch.Tensor) -> None:
        with torch.no_grad():
            correct = self.accelerator.gather_for_metrics(hits).sum()
            total = self.accelerator.gather_for_metrics(torch.tensor(wanted.numel(), device=wanted.device)).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
        if mode == "train":
            mask = inputs.get("attention_mask")
            real = inputs["input_ids"].numel() if mask is None or mask.dim() != 2 else mask.sum()
            tokens = self.accelerator.gather_for_metrics(torch.as_tensor(real, device=wanted.device)).sum().item()
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
