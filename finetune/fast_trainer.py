"""`FastSFTTrainer`: TRL's SFTTrainer with padding-free batches and an LM head run only where there is loss.

The loss is TRL's: the sum of next-token cross-entropies over target tokens (labels != -100) divided by
the number of target tokens in the whole accumulated batch (`num_items_in_batch`), so gradient
accumulation weighs every target token equally. What changes is how it is computed:

- the vocabulary projection (the largest matmul for small models: 576 x 49152 per token for
  SmolLM2-135M) runs only on positions that predict a target token, via the model's own
  `logits_to_keep` (which also applies any model-specific logit scaling or soft-capping);
- training micro-batches are padding-free (`finetune.batching`) when the model passes the isolation
  check; evaluation keeps padded batches, so eval_loss is computed exactly as before;
- the cross-entropy forms its gradient in the forward pass, chunk by chunk (`target_cross_entropy`), so no
  fp32 copy of the logits and no fp32 log-softmax are kept for backward: less peak memory, same arithmetic;
- TRL's per-step entropy metric (a softmax over every position's full logits) is not computed;
  `mean_token_accuracy` is, on the target positions.
"""

from __future__ import annotations

import inspect

import torch
from trl import SFTTrainer

from .batching import PaddedCollator, PaddingFreeCollator, padding_free_mode
from .templates import IGNORE_INDEX


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT wrapper takes `logits_to_keep` (most transformers 5 LMs do)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def target_logits(model, inputs: dict[str, torch.Tensor], keep: torch.Tensor, *, use_keep: bool) -> torch.Tensor:
    """(K, V) logits at the K positions where `keep` (B, T) is True; the head runs there only if `use_keep`."""
    if use_keep:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        if logits.dim() == 2:  # the bool-mask slice flattens to (K, V)
            return logits
        return logits[keep]  # a model that took the argument but kept (B, T, V)
    return model(**inputs, use_cache=False).logits[keep]


def target_token_loss(model, batch: dict[str, torch.Tensor], num_items_in_batch=None, *,
                      use_logits_to_keep: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of cross-entropies over target tokens / `num_items_in_batch` (default: this batch's target count).

    `batch` is a collated batch with `shift_labels` (finetune.batching). Returns (loss, logits (K, V), targets (K,)).
    """
    inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
    targets = batch["shift_labels"]  # (B, T)
    keep = targets != IGNORE_INDEX
    logits = target_logits(model, inputs, keep, use_keep=use_logits_to_keep)  # (K, V)
    wanted = targets[keep]  # (K,)
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch
    divisor = torch.as_tensor(count, device=logits.device, dtype=torch.float32).clamp(min=1)
    return target_cross_entropy(logits, wanted, divisor), logits, wanted


def target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor, *,
                         chunk_rows: int = 256) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets, reduction="sum") / divisor`, and the same gradient, in less memory.

    logits (K, V) in any float dtype, targets (K,), divisor a float32 scalar; returns a float32 scalar.
    """
    return _TargetCrossEntropy.apply(logits, targets, divisor, chunk_rows)


class _TargetCrossEntropy(torch.autograd.Function):
    """Cross-entropy whose gradient is formed in the forward pass, `chunk_rows` rows at a time.

    The plain computation keeps, at the top of the activation pile, an fp32 copy of the logits and the fp32
    log-softmax saved for backward (2 x K x V x 4 bytes: ~350 MB for K = 900 answer tokens and a 49,152-token
    vocabulary), then builds an fp32 gradient of the same size in backward. Here only the gradient is kept, in
    the logits' own dtype (K x V x 2 bytes in bf16), plus one chunk's fp32 temporaries. The arithmetic is
    the same: softmax in fp32, minus one at the target, divided by `divisor`, cast once to the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, divisor, chunk_rows):
        needs_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if needs_grad else None
        for start in range(0, logits.shape[0], chunk_rows):
            part = logits[start:start + chunk_rows].float()  # (C, V) fp32
            wanted = targets[start:start + chunk_rows]  # (C,)
            log_normaliser = torch.logsumexp(part, dim=-1)  # (C,)
            total += (log_normaliser - part.gather(1, wanted[:, None]).squeeze(1)).sum()
            if needs_grad:  # d(sum of CE)/d(logits) = softmax - one-hot(target)
                probs = part.sub_(log_normaliser[:, None]).exp_()
                probs[torch.arange(wanted.numel(), device=wanted.device), wanted] -= 1.0
                grad[start:start + chunk_rows] = probs.div_(divisor)
        ctx.save_for_backward(grad)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors  # x 1.0 (one process) is exact; no .item() here, which would sync a GPU
        return grad * grad_output.to(grad.dtype), None, None, None


class FastSFTTrainer(SFTTrainer):
    """SFTTrainer whose dataset rows are `{"input_ids", "labels"}` (our encoding, labels -100 off-target)."""

    def __init__(self, *args, padding_free: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        pad_id = self.processing_class.pad_token_id
        self.eval_collator = PaddedCollator(pad_id)
        self.batching = padding_free_mode(self.model) if padding_free else None
        self.data_collator = PaddingFreeCollator(self.batching) if self.batching else self.eval_collator
        self.use_logits_to_keep = accepts_logits_to_keep(self.model)
        # our compute_loss always divides by num_items_in_batch, so Trainer must count it and not rescale
        self.model_accepts_loss_kwargs = True

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
        loss, logits, wanted = target_token_loss(model, inputs, num_items_in_batch,
                                                 use_logits_to_keep=self.use_logits_to_keep)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every rank; DDP averages grads
        self._log_batch_metrics(mode, inputs, logits, wanted)
        return (loss, {"logits": logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None  # only the loss is ever evaluated: no logits gathered

    def _log_batch_metrics(self, mode: str, inputs: dict, logits: torch.Tensor, wanted: torch.Tensor) -> None:
        with torch.no_grad():
            correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == wanted).sum()).sum()
            total = self.accelerator.gather_for_metrics(torch.tensor(wanted.numel(), device=wanted.device)).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
        if mode == "train":
            mask = inputs.get("attention_mask")
            real = inputs["input_ids"].numel() if mask is None or mask.dim() != 2 else mask.sum()
            tokens = self.accelerator.gather_for_metrics(torch.as_tensor(real, device=wanted.device)).sum().item()
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
