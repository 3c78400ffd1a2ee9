"""Padding-free batches and the target-only LM head compute exactly what padded, full-logits training computes.

The reference everywhere is the plain computation: each example run alone through the model, full logits,
cross-entropy summed over its target tokens. The packed batch and the fast loss must equal it (relative
difference < 1e-3 in fp32, loss and every gradient), and a deliberately leaky packing must not.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from finetune.speed import segment_attention
from finetune.speed.batching import (
    PaddedCollator,
    PaddingFreeCollator,
    check_lengths,
    forward,
    packed_logits_match,
    padding_free_mode,
    shifted,
    sliding_window,
)
from finetune.speed.fast_trainer import (
    ReusedBuffer,
    target_cross_entropy,
    target_cross_entropy_and_hits,
    target_token_loss,
)
from finetune.templates import IGNORE_INDEX

TOLERANCE = 1e-3  # relative, fp32; the correct paths differ by ~1e-6, a leak by ~1e-1


def load_demo(demo_model_dir, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32,
                                                attn_implementation=attn).train()


def examples(vocab: int) -> list[dict]:
    """Three examples of different lengths; the first tokens of each are a prompt without loss."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((9, 4), (14, 6), (5, 2)):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def reference_loss_and_grads(model, feats: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """Each example alone, full logits: sum of target-token cross-entropies / number of target tokens."""
    model.zero_grad()
    total, count = 0.0, 0
    for f in feats:
        logits = model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0]  # (T, V)
        targets = torch.tensor(shifted(f["labels"]))
        total = total + F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def batch_loss_and_grads(model, batch: dict, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = target_token_loss(model, batch, **kw).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def worst_relative_difference(a: tuple[float, dict], b: tuple[float, dict]) -> float:
    diffs = [abs(a[0] - b[0]) / abs(b[0])]
    diffs += [((a[1][n] - g).norm() / g.norm().clamp(min=1e-12)).item() for n, g in b[1].items()]
    return max(diffs)


class LeakyCollator(PaddingFreeCollator):
    """Packs like the real collator but with a plain causal mask over the whole row: examples see each other."""

    def __call__(self, features):
        batch = super().__call__(features)
        if self.mode == "segments":  # one segment spanning the whole row
            batch["cu_seq_lens_q"] = torch.tensor([0, batch["input_ids"].shape[1]], dtype=torch.int32)
        else:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch


# ----------------------------------------------------------------------------- pure
def test_shifted_labels_never_cross_an_example():
    assert shifted([IGNORE_INDEX, 5, 6]) == [5, 6, IGNORE_INDEX]
    batch = PaddingFreeCollator("position_ids")([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                                              {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # position 2 (last of the first example) must not be trained to predict token 4 (first of the second)
    assert batch["shift_labels"].tolist() == [[2, 3, -100, 5, -100]]


def test_padded_collator_pads_inputs_and_ignores_pad_targets():
    batch = PaddedCollator(pad_token_id=0)([{"input_ids": [7, 8, 9], "labels": [-100, 8, 9]},
                                           {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[7, 8, 9], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["shift_labels"].tolist() == [[8, 9, -100], [-100, -100, -100]]


# ----------------------------------------------------------------------------- equivalence on the demo model
@pytest.mark.parametrize("attn, mode", [("sdpa", "position_ids"), ("eager", "position_ids"), ("sdpa", "segments"),
                                        ("eager", "segments")])
def test_packed_batch_equals_examples_one_by_one(demo_model_dir, attn, mode):
    model = load_demo(demo_model_dir, attn)
    feats = examples(model.config.vocab_size)
    reference = reference_loss_and_grads(model, feats)
    packed = batch_loss_and_grads(model, PaddingFreeCollator(mode)(feats))
    assert worst_relative_difference(packed, reference) < TOLERANCE
    # the same comparison catches a packing that lets examples attend to each other
    leaky = batch_loss_and_grads(model, LeakyCollator(mode)(feats))
    assert worst_relative_difference(leaky, reference) > 10 * TOLERANCE


def test_padded_batch_equals_examples_one_by_one(demo_model_dir):
    model = load_demo(demo_model_dir)
    feats = examples(model.config.vocab_size)
    padded = batch_loss_and_grads(model, PaddedCollator(model.config.pad_token_id)(feats))
    assert worst_relative_difference(padded, reference_loss_and_grads(model, feats)) < TOLERANCE


@pytest.mark.parametrize("padding_free", [True, False])
def test_target_only_head_equals_full_logits_loss_and_gradients(demo_model_dir, padding_free):
    model = load_demo(demo_model_dir)
    feats = examples(model.config.vocab_size)
    batch = (PaddingFreeCollator("position_ids") if padding_free else PaddedCollator(0))(feats)
    fast = batch_loss_and_grads(model, batch, use_logits_to_keep=True)
    full = batch_loss_and_grads(model, batch, use_logits_to_keep=False)
    assert worst_relative_difference(fast, full) < 1e-5
    # dividing by the accumulated batch's count (gradient accumulation) scales the loss, nothing else
    loss = target_token_loss(model, batch, num_items_in_batch=100).loss
    assert loss.item() == pytest.approx(full[0] * sum(t != -100 for f in feats for t in f["labels"][1:]) / 100,
                                        rel=1e-5)


@pytest.mark.parametrize("attn, mode", [("sdpa", "position_ids"), ("eager", "position_ids"), ("sdpa", "segments")])
def test_changing_one_example_leaves_the_others_logits_unchanged(demo_model_dir, attn, mode):
    model = load_demo(demo_model_dir, attn).eval()
    feats = examples(model.config.vocab_size)
    altered = [dict(feats[0], input_ids=[(t + 1) % model.config.vocab_size for t in feats[0]["input_ids"]])] + feats[1:]
    with torch.no_grad():
        before = forward(model, _inputs(PaddingFreeCollator(mode)(feats))).logits[0]
        after = forward(model, _inputs(PaddingFreeCollator(mode)(altered))).logits[0]
        leaky = forward(model, _inputs(LeakyCollator(mode)(altered))).logits[0]
    first = len(feats[0]["input_ids"])
    assert not torch.allclose(after[:first], before[:first]), "the altered example's own logits change"
    torch.testing.assert_close(after[first:], before[first:], rtol=0, atol=1e-5)
    assert (leaky[first:] - before[first:]).abs().max() > 1e-2, "without the mask they would change"


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "shift_labels"}


# ----------------------------------------------------------------------------- choosing the mode
def test_mode_follows_the_attention_kernel_and_is_verified(demo_model_dir, monkeypatch):
    # on CPU: per-example attention, for both kernels
    assert padding_free_mode(load_demo(demo_model_dir, "sdpa")) == "segments"
    assert padding_free_mode(load_demo(demo_model_dir, "eager")) == "segments"
    # where per-example attention does not isolate (here: made to attend across the whole row), transformers' masks
    monkeypatch.setattr(segment_attention.SegmentAttention, "apply", _whole_row_attention)
    assert padding_free_mode(load_demo(demo_model_dir, "sdpa")) == "position_ids"
    assert padding_free_mode(load_demo(demo_model_dir, "eager")) == "position_ids"
    # eager adds the mask to the scores: a bool mask there is wrong, and the check says so
    assert not packed_logits_match(load_demo(demo_model_dir, "eager"), WindowlessMaskCollator(float_mask=False))


def test_a_model_with_state_across_the_row_is_never_packed():
    """Mamba carries a recurrent state along the row whatever the mask says: packing it would leak."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2))
    assert padding_free_mode(model) is None


# ----------------------------------------------------------------------------- sliding windows (real architectures)
WINDOWED = ["mistral", "phi3", "qwen2", "gemma2"]  # window 16 (tests/real_models.py); Gemma-2 alternates with full


def windowless_mask(lengths: list[int], *, float_mask: bool) -> torch.Tensor:
    """The old hand-built (1, 1, T, T) block-diagonal causal mask: right for full attention, blind to any window."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (T,) example index
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    if not float_mask:
        return allowed[None, None]
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]


class WindowlessMaskCollator(PaddingFreeCollator):
    """Packs with `windowless_mask` (bool for sdpa, float for eager), as the old `bool_mask`/`float_mask` modes did."""

    def __init__(self, float_mask: bool):
        super().__init__("position_ids")
        self.float_mask = float_mask

    def __call__(self, features):
        batch = super().__call__(features)
        batch["attention_mask"] = windowless_mask([len(f["input_ids"]) for f in features], float_mask=self.float_mask)
        return batch


def windowed_model(family: str):
    from real_models import tiny_model

    return tiny_model(family, window=16).train()  # sdpa, eager for Gemma-2; no dropout in these configs


def long_examples(vocab: int) -> list[dict]:
    """Two examples longer than the window of 16 (40 and 23 tokens), with prompt tokens that carry no loss."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((40, 6), (23, 3)):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("family", WINDOWED)
def test_packed_examples_longer_than_the_window_equal_each_example_alone(family):
    """Loss and every parameter gradient of the chosen padding-free batch equal each example run alone (which
    attends through the window), and the old windowless mask does not."""
    model = windowed_model(family)
    assert sliding_window(model) == 16
    feats = long_examples(model.config.vocab_size)
    reference = reference_loss_and_grads(model, feats)
    mode = padding_free_mode(model)
    assert mode == "position_ids", "sliding windows (and Gemma-2's soft-capping) are left to transformers' masks"
    packed = batch_loss_and_grads(model, PaddingFreeCollator(mode)(feats))
    assert worst_relative_difference(packed, reference) < TOLERANCE
    float_mask = model.config._attn_implementation == "eager"
    windowless = batch_loss_and_grads(model, WindowlessMaskCollator(float_mask)(feats))
    assert worst_relative_difference(windowless, reference) > 10 * TOLERANCE


@pytest.mark.parametrize("family", WINDOWED)
def test_the_isolation_check_packs_past_the_window_and_refuses_a_windowless_mask(family):
    model = windowed_model(family).eval()
    lengths = check_lengths(model)
    assert lengths == (23, 21)  # both longer than the window of 16
    assert packed_logits_match(model, PaddingFreeCollator("position_ids"), lengths)
    float_mask = model.config._attn_implementation == "eager"
    assert not packed_logits_match(model, WindowlessMaskCollator(float_mask), lengths)
    # a window that no example can exceed never matters: the check stays short
    assert check_lengths(model, max_length=16) == (7, 5) and check_lengths(model, max_length=17) == (23, 21)


def test_a_model_without_a_window_keeps_per_example_attention():
    """Llama (full attention, no soft-capping), and Qwen2 with its window switched off: `segments` on CPU."""
    from real_models import tiny_model

    for family in ("llama", "qwen2"):
        model = tiny_model(family, window=None)
        assert sliding_window(model) is None and check_lengths(model) == (7, 5)
        assert padding_free_mode(model) == "segments"


# ----------------------------------------------------------------------------- end to end
def test_training_learns_the_same_with_and_without_padding_free(demo_model_dir, tmp_path):
    """Two fp32 runs, padding-free vs padded batches: same losses, same adapter (no dropout, same data order)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from finetune.config import RunConfig
    from finetune.train import train

    data = Path(__file__).resolve().parents[1] / "examples/data/python_qa.jsonl"
    common = dict(base_model=str(demo_model_dir), dataset=str(data), max_rows=8, eval_fraction=0.0,
                  test_fraction=0.0, max_steps=2, batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
                  learning_rate=3e-3, lora_dropout=0.0, precision="fp32", max_seq_length=128)
    runs = {pf: train(RunConfig(**common, padding_free=pf, output_dir=str(tmp_path / str(pf)))) for pf in (True, False)}
    a = load_file(runs[True].final_dir / "adapter_model.safetensors")
    b = load_file(runs[False].final_dir / "adapter_model.safetensors")
    for key in a:
        # Adam divides by sqrt(v): summation-order noise in a near-zero gradient moves that weight by up to ~0.1% of
        # one step (lr 3e-3); a batching bug would move it by whole steps
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert runs[True].results["train_loss"] == pytest.approx(runs[False].results["train_loss"], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_target_cross_entropy_equals_cross_entropy_and_its_gradient(dtype):
    """The loss whose gradient is formed in the forward pass, chunk by chunk, is F.cross_entropy's, and so is
    its gradient, to the rounding of the plain computation (fp32 softmax, one cast to the logits' dtype)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 101, generator=g) * 3).to(dtype)
    targets = torch.randint(101, (37,), generator=g)
    divisor = torch.tensor(50.0)  # target tokens of the whole accumulated batch: more than these 37
    for scale in (1.0, 2.0):  # backward's incoming gradient: 1 alone, the number of processes under DDP
        plain = logits.clone().requires_grad_()
        expected = F.cross_entropy(plain.float(), targets, reduction="sum") / divisor
        (expected * scale).backward()
        fast = logits.clone().requires_grad_()
        got = target_cross_entropy(fast, targets, divisor, chunk_rows=8)  # 5 chunks, the last one short
        (got * scale).backward()
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        assert got.dtype == torch.float32
        # fp32: the same formula in another order of rounding (~1 ulp); bf16: at most one bf16 rounding step apart
        ulp = {torch.float32: 1e-5, torch.bfloat16: 2**-7}[dtype]
        torch.testing.assert_close(fast.grad, plain.grad, rtol=ulp, atol=1e-9)


@pytest.mark.parametrize("reused", [False, True])
@pytest.mark.parametrize("scale", [2.0**16, 2.0**10])
def test_fp16_logits_get_the_plain_gradient_under_gradscaler(scale, reused):
    """Under fp16 mixed precision the loss reaches backward multiplied by GradScaler's scale (2^16 at first, above
    fp16's 65504). The gradient must come back finite and equal to F.cross_entropy's autograd in fp32 cast once to
    fp16 (as the plain path casts it): to one fp16 rounding step (relative 2^-10, or 2^-24 absolute, fp16's
    subnormal spacing), keeping the whole off-target part (softmax / target count) that the plain path keeps; in
    fresh memory and in a `ReusedBuffer`."""
    g = torch.Generator().manual_seed(0)
    rows, vocab, count = 64, 8192, 4000.0  # a clear favourite and a long tail, as trained logits have
    targets = torch.randint(vocab, (rows,), generator=g)
    logits = 2.0 * torch.randn(rows, vocab, generator=g)
    logits[torch.arange(rows), targets] += 8.0
    logits = logits.half()
    plain = logits.float().requires_grad_()
    (F.cross_entropy(plain, targets, reduction="sum") / count * scale).backward()
    fast = logits.clone().requires_grad_()
    loss, _ = target_cross_entropy_and_hits(fast, targets, torch.tensor(count), chunk_rows=8,
                                            grad_buffer=ReusedBuffer() if reused else None)
    (loss * scale).backward()
    assert fast.grad.dtype == torch.float16 and fast.grad.isfinite().all()
    torch.testing.assert_close(fast.grad, plain.grad.half(), rtol=2**-10, atol=2**-24)
    off_target = torch.ones(rows, vocab, dtype=torch.bool)
    off_target[torch.arange(rows), targets] = False
    kept = fast.grad.float()[off_target].sum() / plain.grad[off_target].sum()
    assert kept.item() == pytest.approx(1.0, abs=1e-4)


def test_the_gradient_buffer_is_reused_and_changes_nothing():
    """Micro-batch after micro-batch (backward in between), the cross-entropy's gradient lands in the same memory,
    and every loss and gradient equals the one computed with fresh memory."""
    buffer = ReusedBuffer()
    g = torch.Generator().manual_seed(2)
    places = set()
    for rows in (37, 20, 37, 41):  # a smaller gradient fits the memory; a larger one within the room left too
        logits = (torch.randn(rows, 101, generator=g) * 3).bfloat16()
        targets = torch.randint(101, (rows,), generator=g)
        fresh, reused = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        expected, _ = target_cross_entropy_and_hits(fresh, targets, torch.tensor(50.0), chunk_rows=8)
        got, _ = target_cross_entropy_and_hits(reused, targets, torch.tensor(50.0), chunk_rows=8, grad_buffer=buffer)
        expected.backward()
        got.backward()
        assert got.item() == expected.item() and torch.equal(reused.grad, fresh.grad)
        places.add(buffer._flat.data_ptr())
    assert len(places) == 1


def test_hits_count_the_targets_with_the_highest_logit():
    """Token accuracy comes from the cross-entropy's own pass: a hit is a target whose logit is its row's highest."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 101, generator=g)
    targets = torch.randint(101, (37,), generator=g)
    targets[::3] = logits[::3].argmax(-1)  # 13 rows where the target is the top logit
    loss, hits = target_cross_entropy_and_hits(logits.bfloat16(), targets, torch.tensor(37.0), chunk_rows=8)
    assert hits.item() == (logits.bfloat16().argmax(-1) == targets).sum().item() >= 13
    tied = torch.zeros(2, 5)
    tied[:, 1] = tied[:, 3] = 1.0  # two top logits per row: either one is a hit, another token is not
    assert target_cross_entropy_and_hits(tied, torch.tensor([3, 1]), torch.tensor(2.0))[1].item() == 2
    assert target_cross_entropy_and_hits(tied, torch.tensor([0, 4]), torch.tensor(2.0))[1].item() == 0


def test_chunked_target_cross_entropy_keeps_no_gradient_without_grad():
    logits = torch.randn(5, 11)
    targets = torch.tensor([0, 3, 10, 2, 2])
    with torch.no_grad():
        loss = target_cross_entropy(logits, targets, torch.tensor(5.0))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert loss.grad_fn is None


def test_frozen_weights_stored_in_bf16_train_bit_identically(demo_model_dir, tmp_path, monkeypatch):
    """Under bf16 autocast, storing the frozen linear weights in bf16 changes nothing: same per-step losses and the
    same adapter, bit for bit, as fp32 storage (autocast rounds them the same way at every forward). Dropout on, so
    the RNG stream must match too."""
    from pathlib import Path

    from safetensors.torch import load_file

    from finetune.config import RunConfig
    from finetune.speed import fast_trainer
    from finetune.train import train

    seen = {}
    real = fast_trainer.frozen_linears

    def recording(model):
        layers = real(model)
        seen["dtypes"] = {layer.weight.dtype for layer in layers}
        return layers

    data = Path(__file__).resolve().parents[1] / "examples/data/python_qa.jsonl"
    common = dict(base_model=str(demo_model_dir), dataset=str(data), max_rows=8, eval_fraction=0.0,
                  test_fraction=0.0, max_steps=3, batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
                  learning_rate=3e-3, lora_dropout=0.1, precision="bf16", max_seq_length=128)
    monkeypatch.setattr(fast_trainer, "frozen_linears", recording)
    half = train(RunConfig(**common, output_dir=str(tmp_path / "half")))
    assert seen["dtypes"] == {torch.float32}, "fp32 layers were found and converted"
    assert len(real(half.model)) == 7 * half.model.config.num_hidden_layers + 1, "q,k,v,o,gate,up,down + the head"
    head, embeddings = half.model.get_output_embeddings(), half.model.get_input_embeddings()
    assert head.weight is embeddings.weight, "the tied head shares the embedding weight again after training"
    full = train(RunConfig(**common, speed_levers_off=["half_frozen_weights"],  # the control: fp32 storage
                           output_dir=str(tmp_path / "fp32")))

    def losses(run):
        records = map(json.loads, (run.output_dir / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if r["loss"] is not None]

    assert losses(half) == losses(full) and len(losses(half)) == 3
    a = load_file(half.final_dir / "adapter_model.safetensors")
    b = load_file(full.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.dtype == torch.float32 for p in half.model.parameters()), "fp32 again after training"


# ----------------------------------------------------------------------------- per-example attention
_real_apply = segment_attention.SegmentAttention.apply


def _whole_row_attention(query, key, value, lengths, scale, dtype):
    """A leaky variant: one segment over the whole row (examples see the earlier ones)."""
    return _real_apply(query, key, value, (sum(lengths),), scale, dtype)


def _reference_attention(query, key, value, lengths):
    """sdpa, causal, each example alone, grouped-query heads repeated."""
    groups = query.shape[1] // key.shape[1]
    outs, start = [], 0
    for n in lengths:
        span = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(query[:, :, span], key[:, :, span].repeat_interleave(groups, 1),
                                                   value[:, :, span].repeat_interleave(groups, 1), is_causal=True))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize("block_rows", [128, 4])  # one block per example; several (keys stop at each block's end)
@pytest.mark.parametrize("autocast", [False, True])
def test_segment_attention_equals_sdpa_per_example_with_gradients(autocast, block_rows, monkeypatch):
    """Outputs and Q/K/V gradients equal sdpa run on each example alone: fp32 to 1e-5, bf16 autocast to its
    rounding; and one segment over the whole row (a leak) is far off."""
    monkeypatch.setattr(segment_attention, "BLOCK_ROWS", block_rows)
    g = torch.Generator().manual_seed(0)
    lengths, heads, kv_heads, dim = (5, 11, 1, 8), 6, 2, 16
    total = sum(lengths)
    leaves = [torch.randn(1, h, total, dim, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
    weights = torch.randn(1, total, heads, dim, generator=g)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)

    def run(fn):
        for leaf in leaves:
            leaf.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn()
        (out.float() * weights).sum().backward()
        return [out.detach().float()] + [leaf.grad.clone() for leaf in leaves]

    ours = run(lambda: segment_attention.segment_attention_forward(None, *leaves, cu_seq_lens_q=cu)[0])
    reference = run(lambda: _reference_attention(*leaves, lengths))
    leaky = run(lambda: segment_attention.segment_attention_forward(
        None, *leaves, cu_seq_lens_q=torch.tensor([0, total], dtype=torch.int32))[0])
    tolerance = 2e-2 if autocast else 1e-5
    for a, b, c in zip(ours, reference, leaky):
        assert ((a - b).norm() / b.norm()).item() < tolerance
        assert ((c - b).norm() / b.norm()).item() > 10 * tolerance
    assert ours[0].dtype == torch.float32 and leaves[0].grad.dtype == torch.float32


@pytest.mark.parametrize("autocast", [False, True])
def test_segment_attention_backward_is_the_same_whether_it_keeps_or_recomputes_probabilities(autocast, monkeypatch):
    """Forward keeps P for short examples; for long ones backward recomputes it. Both give the same bits, and a
    retained graph can be run backward twice."""
    monkeypatch.setattr(segment_attention, "BLOCK_ROWS", 4)
    g = torch.Generator().manual_seed(1)
    lengths, heads, kv_heads, dim = (3, 9, 6), 4, 2, 8
    leaves = [torch.randn(1, h, sum(lengths), dim, generator=g, requires_grad=True)
              for h in (heads, kv_heads, kv_heads)]
    weights = torch.randn(1, sum(lengths), heads, dim, generator=g)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)

    def grads(keep_up_to, backwards=1):
        monkeypatch.setattr(segment_attention, "KEEP_PROBABILITIES_UP_TO", keep_up_to)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = segment_attention.segment_attention_forward(None, *leaves, cu_seq_lens_q=cu)[0]
        kept = len(out.grad_fn.saved_tensors) - 4  # Q, K, V and O, then one P per kept block
        loss = (out.float() * weights).sum()
        found = []
        for i in range(backwards):
            found = torch.autograd.grad(loss, leaves, retain_graph=i + 1 < backwards)
        return kept, [out.detach(), *found]

    kept_all, keeping = grads(9)
    kept_some, mixed = grads(6)  # the 9-token example is recomputed
    kept_none, recomputing = grads(0)
    assert (kept_all, kept_some, kept_none) == (1 + 3 + 2, 1 + 2, 0)  # blocks of 4 rows: 3 -> 1, 9 -> 3, 6 -> 2
    for a, b, c in zip(keeping, mixed, recomputing):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(torch.equal(a, b) for a, b in zip(grads(9, backwards=2)[1], keeping))


def test_segment_attention_refuses_what_it_does_not_compute():
    """Soft-capping, sliding windows and attention sinks change the softmax: such models get a mask instead."""
    q, k = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for extra in ({"softcap": 30.0}, {"sliding_window": 4096}, {"s_aux": torch.zeros(2)}):
        with pytest.raises(ValueError, match="plain causal attention"):
            segment_attention.segment_attention_forward(None, q, k, k, cu_seq_lens_q=cu, **extra)
    assert segment_attention.segment_attention_forward(None, q, k, k, cu_seq_lens_q=cu, sliding_window=None)[0].shape \
        == (1, 4, 2, 8)


def test_chunked_cross_entropy_stays_exact_when_the_target_probability_underflows():
    """A target ~120 nats below the best logit: softmax underflows to 0 in fp32, the loss must still be ~120."""
    logits = torch.zeros(3, 50)
    logits[:, 0] = 120.0
    targets = torch.tensor([1, 0, 2])
    loss = target_cross_entropy(logits, targets, torch.tensor(1.0))
    expected = F.cross_entropy(logits, targets, reduction="sum")
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)
