"""GPU acceptance check: the CUDA paths of `finetune` on SmolLM2-135M- and Llama-3.2-1B-shaped random models.

    bash benchmarks/gpu_check.sh                         # everything, both models, < 8 min on one H100-class GPU
    bash benchmarks/gpu_check.sh --dry-run               # the plan (configs, parameter counts); no GPU needed
    bash benchmarks/gpu_check.sh --models 1b --only qlora,merge --steps 10

Per model (random weights built on the GPU, saved once with the demo tokenizer, `finetune.demo`):
- lora-bf16, lora-fp16 (what a T4 gets), qlora (4-bit NF4 through CUDA bitsandbytes): `finetune.train.train`
  on synthetic prompt/completion rows, exactly as the CLI runs it (padding-free batches on); tokens/s is the
  steady state from metrics.jsonl (step 1, with its CUDA warm-up, excluded);
- padding-free: one LoRA micro-batch padded vs padding-free (`finetune.speed.batching`, sdpa with
  transformers' packed-sequence masks from `position_ids`): same loss and gradients, and the speed of each
  (collate + forward + backward);
- flash-attn: the same with FlashAttention-2 varlen (`position_ids`), when `flash_attn` imports;
- merge: `finetune.merge.merge_adapter` of the lora-bf16 run: merged vs base + adapter logits (fp32: exact up
  to summation order; bf16, the app's default, reported), and that the merge changed the base's logits;
- generate: `finetune.inference.ChatModel.from_run(...).stream`, base then fine-tuned, as the compare view does.
Once: auto-precision (`precision: auto` must pick bf16 only where the GPU has it natively), fp16-gradient (the
fused cross-entropy's gradient of the logits under fp16 loss scaling, against autograd in fp32) and the matmul peak.

MFU = model FLOPs/s over the measured bf16 (fp16 for lora-fp16) matmul peak, with 6 x parameters FLOPs per
trained token and 2 x parameters per generated token. For LoRA/QLoRA 6N is the usual convention, not the work
done: frozen weights get no weight gradient (~4N). Attention's n^2 work is not counted.

Every check returns a dict (check, model, status, tokens_per_s, peak_memory_mb, mfu, seconds, error, details) and
a failure never stops the others. A check that would start after `--budget-s` seconds is skipped with a line
saying so. Prints a table, writes JSON (`--out`), exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "gpu_check.json"
DEVICE = "cuda"  # where every check runs


# ----------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class ModelSpec:
    key: str
    shape_of: str  # the real model whose shape this is
    config: dict   # LlamaConfig fields


MODELS = {
    "smollm2-135m": ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "1b": ModelSpec("1b", "meta-llama/Llama-3.2-1B", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}

# Per-model checks, in the order they run; merge and generate use lora-bf16's run folder.
CHECKS = ("lora-bf16", "merge", "generate", "lora-fp16", "qlora", "padding-free", "flash-attn")
GLOBAL_CHECKS = ("auto-precision", "fp16-gradient")
NEEDS = {"merge": "lora-bf16", "generate": "lora-bf16"}

# Pass thresholds (judgement, not measurements): bf16 rounding stays well inside them; a wrong mask does not.
PACKED_LOSS_RTOL = 0.01        # padded vs padding-free loss, relative
PACKED_GRAD_MIN_COSINE = 0.99  # padded vs padding-free LoRA gradients
MERGE_FP32_ATOL = 1e-3         # merged vs base + adapter logits, fp32
MERGE_MIN_EFFECT_RATIO = 10.0  # the adapter must move the logits 10x more than the merge error
FP16_MIN_MASS_KEPT = 0.99      # off-target share of the cross-entropy gradient kept under fp16 mixed precision


def llama_config(spec: ModelSpec, *, eos_token_id: int | None = None, pad_token_id: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(**spec.config, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def build_model(spec: ModelSpec, device: str, dtype=None, **ids):
    """The random-weight model, allocated on `device` directly ("meta": shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(llama_config(spec, **ids), dtype=dtype or torch.bfloat16)


@functools.cache
def count_parameters(model: str) -> int:
    """Parameters of MODELS[model] (tied embeddings once), from its config alone (built on the meta device)."""
    return sum(p.numel() for p in build_model(MODELS[model], "meta").parameters())


# ----------------------------------------------------------------------------- arguments and plan
def _names(choices: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
                                             f"choose from {','.join(choices)}")
        return names
    return parse


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_names(tuple(MODELS), "model"), default=list(MODELS),
                   help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    p.add_argument("--only", type=_names(CHECKS + GLOBAL_CHECKS, "check"), default=None,
                   help=f"comma-separated, from {','.join(CHECKS + GLOBAL_CHECKS)} (default: all); merge and "
                        "generate bring lora-bf16 along")
    p.add_argument("--steps", type=_at_least(2), default=20, help="optimizer steps per training check (default 20)")
    p.add_argument("--seq-len", type=_at_least(128), default=1024, help="max_seq_length, tokens (default 1024)")
    p.add_argument("--batch-size", type=_at_least(2), default=8, help="examples per micro-batch (default 8)")
    p.add_argument("--new-tokens", type=_at_least(1), default=128, help="tokens per generated answer (default 128)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip checks that would start after this many seconds (default 330)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where model folders and runs go (default: a temporary folder, removed at the end)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (configs, parameter counts); no CUDA")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[str | None, str]]:
    """(model key or None for a once-only check, check name), in running order."""
    wanted = set(args.only or CHECKS + GLOBAL_CHECKS)
    wanted |= {NEEDS[c] for c in wanted if c in NEEDS}
    steps: list[tuple[str | None, str]] = [(None, c) for c in GLOBAL_CHECKS if c in wanted]
    for model in args.models:
        steps += [(model, c) for c in CHECKS if c in wanted]
    return steps


def describe_plan(args: argparse.Namespace) -> list[str]:
    lines = ["GPU acceptance check, plan:",
             "  matmul peak: bf16 and fp16 GEMM (the MFU denominators)",
             f"  training: {args.steps} steps x {args.batch_size} examples of up to {args.seq_len} tokens; "
             f"generation: {args.new_tokens} new tokens per answer; time budget {args.budget_s:g} s"]
    for model in args.models:
        spec = MODELS[model]
        cfg = spec.config
        lines.append(f"  {model}: {count_parameters(model):,} parameters ({spec.shape_of} shape: hidden "
                     f"{cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads, "
                     f"{cfg['num_key_value_heads']} kv heads, intermediate {cfg['intermediate_size']}, vocab "
                     f"{cfg['vocab_size']}, tied embeddings)")
    flash = "flash_attn importable" if importlib.util.find_spec("flash_attn") else "flash_attn not installed: skipped"
    for model, check in plan(args):
        note = f" ({flash})" if check == "flash-attn" else ""
        lines.append(f"  - {check}{' on ' + model if model else ''}{note}")
    return lines


# ----------------------------------------------------------------------------- arithmetic
def training_flops_per_token(n_params: int) -> float:
    return 6.0 * n_params  # forward 2N + backward 4N


def generation_flops_per_token(n_params: int) -> float:
    return 2.0 * n_params


def mfu(flops_per_token: float, tokens_per_s: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOPs/s as a fraction of the measured matmul peak."""
    if not tokens_per_s or not peak_flops:
        return None
    return flops_per_token * tokens_per_s / peak_flops


def steady_tokens_per_s(records: list[dict]) -> float | None:
    """Tokens/s between the first and last metrics.jsonl records (so step 1's warm-up is left out)."""
    timed = [r for r in records if r.get("num_tokens") is not None and r.get("elapsed_s") is not None]
    if len(timed) < 2 or timed[-1]["elapsed_s"] <= timed[0]["elapsed_s"]:
        return None
    return (timed[-1]["num_tokens"] - timed[0]["num_tokens"]) / (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"])


# ----------------------------------------------------------------------------- data
def synthetic_rows(tokenizer, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """`n` distinct prompt/completion rows cut from the demo corpus, completions of seq_len/4 to seq_len - 32
    tokens (mixed lengths, so that padding costs what it costs in real data)."""
    from finetune.demo import CORPUS_PATH

    paragraphs = [p + "\n\n" for p in CORPUS_PATH.read_text(encoding="utf-8").split("\n\n")]
    corpus = [t for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"] for t in ids]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length, start = rng.randint(seq_len // 4, seq_len - 32), rng.randrange(len(corpus))
        ids = [corpus[(start + j) % len(corpus)] for j in range(length)]
        rows.append({"prompt": f"Passage {i}: continue the text.", "completion": tokenizer.decode(ids)})
    return rows


def encoded_batch(rows: list[dict], tokenizer, seq_len: int, batch_size: int) -> list[dict]:
    """The first `batch_size` rows as the trainer sees them: `{"input_ids", "labels"}` (finetune.templates)."""
    from finetune.data import normalize_rows
    from finetune.templates import apply_template_choice, encode_example

    apply_template_choice(tokenizer, "auto")
    examples = normalize_rows(rows[:batch_size]).examples
    return [{k: e[k] for k in ("input_ids", "labels")}
            for e in (encode_example(ex, tokenizer, max_seq_length=seq_len) for ex in examples)]


# ----------------------------------------------------------------------------- CUDA helpers
def matmul_peak_flops(dtype_name: str, size: int = 8192, reps: int = 20) -> float:
    """Best of `reps` (size x size) @ (size x size) GEMMs, in FLOP/s, timed with CUDA events."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel, clocks ramp up
        torch.matmul(a, b, out=c)
    best = math.inf
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)  # ms → s
    del a, b, c
    return 2.0 * size**3 / best


def save_model_folder(spec: ModelSpec, folder: Path) -> Path:
    """The random-weight model (bf16, built on the GPU) and the demo tokenizer, loadable as `base_model`."""
    import torch

    from finetune.demo import IM_END, PAD_TOKEN, build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    model = build_model(spec, DEVICE, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    del model
    return folder


def peak_memory_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def free_cuda_memory() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the checks
@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    peaks: dict[str, float]                # matmul peak FLOP/s by dtype name
    model_dirs: dict[str, Path]            # model key → saved random model
    rows: list[dict]                       # synthetic training rows
    runs: dict[tuple[str, str], Path]      # (model, check) → finished run folder
    build_errors: dict[str, str]           # model key → why its folder could not be built


def outcome(ok: bool, *, tokens_per_s: float | None = None, mfu: float | None = None, error: str | None = None,
            **details: Any) -> dict:
    return {"ok": ok, "tokens_per_s": tokens_per_s, "mfu": mfu, "error": error, "details": details}


def check_auto_precision(ctx: Context, model: None) -> dict:
    """`precision: auto` picks bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 below (T4, V100)."""
    import torch

    from finetune.models import resolve_precision

    major, minor = torch.cuda.get_device_capability()
    expected, got = ("bf16" if major >= 8 else "fp16"), resolve_precision("auto")
    error = None if got == expected else (
        f"`precision: auto` picks {got} on this compute-capability {major}.{minor} GPU, expected {expected}: "
        "torch.cuda.is_bf16_supported() counts emulated bf16; finetune/models.py resolve_precision should pass "
        "including_emulation=False")
    return outcome(got == expected, error=error, picked=got, compute_capability=f"{major}.{minor}")


def check_fp16_gradient(ctx: Context, model: None) -> dict:
    """`finetune.fast_trainer.target_cross_entropy` under fp16 mixed precision, as lora-fp16 trains (a T4): the
    loss is multiplied by GradScaler's scale (2^16 at first, later less) before backward. The logits' gradient
    must come back finite and keep the off-target part (softmax probabilities / target count) that autograd in
    fp32 has. Logits: 512 rows over a 49,152 vocabulary with a clear favourite and a long tail; 4,000 targets
    in the accumulated batch (8 x 512-token examples)."""
    import torch
    import torch.nn.functional as F

    from finetune.speed.fast_trainer import target_cross_entropy

    rows, vocab, count = 512, 49152, 4000.0
    generator = torch.Generator(DEVICE).manual_seed(0)
    targets = torch.randint(vocab, (rows,), device=DEVICE, generator=generator)
    logits = 2.0 * torch.randn(rows, vocab, device=DEVICE, generator=generator)
    logits[torch.arange(rows, device=DEVICE), targets] += 8.0
    logits = logits.half()
    reference = logits.float().requires_grad_()
    (F.cross_entropy(reference, targets, reduction="sum") / count).backward()
    off_target = torch.ones_like(reference, dtype=torch.bool)
    off_target[torch.arange(rows, device=DEVICE), targets] = False
    found = {}
    for scale in (2.0**16, 2.0**10):
        half = logits.clone().requires_grad_()
        (target_cross_entropy(half, targets, torch.tensor(count, device=DEVICE)) * scale).backward()
        grad = half.grad.float() / scale
        found[f"scale_2^{int(math.log2(scale))}"] = {
            "finite": bool(grad.isfinite().all()),
            "off_target_mass_kept": float(grad[off_target].sum() / reference.grad[off_target].sum()),
            "off_target_zeros": float((grad[off_target] == 0).float().mean())}
    ok = all(f["finite"] and f["off_target_mass_kept"] >= FP16_MIN_MASS_KEPT for f in found.values())
    error = None if ok else ("fp16 cross-entropy gradient: " + "; ".join(
        f"{k}: {'finite' if f['finite'] else 'inf/nan'}, off-target mass kept {f['off_target_mass_kept']:.3f}"
        for k, f in found.items()) + f" (need finite and >= {FP16_MIN_MASS_KEPT})")
    return outcome(ok, error=error, **found)


def _train_run(ctx: Context, model: str, name: str, **changes: Any) -> dict:
    """`finetune.train.train` on the synthetic rows: as the CLI runs it, no evaluation splits, one save at the end."""
    from finetune.config import RunConfig
    from finetune.train import train

    args = ctx.args
    out = ctx.work / f"{model}-{name}"
    config = RunConfig(base_model=str(ctx.model_dirs[model]), max_steps=args.steps, batch_size=args.batch_size,
                       gradient_accumulation_steps=1, max_seq_length=args.seq_len, eval_fraction=0.0,
                       test_fraction=0.0, logging_steps=1, save_steps=args.steps, output_dir=str(out), seed=0,
                       **changes)
    result = train(config, rows=ctx.rows)
    results = result.results
    del result  # drops the trained model
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    tok_s = steady_tokens_per_s(records)
    peak = ctx.peaks.get("fp16" if results["precision"] == "fp16" else "bf16")
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    ok = results["status"] == "finished" and results["global_step"] == args.steps and finite
    error = None if ok else (f"status {results['status']}, {results['global_step']}/{args.steps} steps, "
                             f"losses {'finite' if finite else 'not finite: ' + str(losses)}")
    if ok:
        ctx.runs[(model, name)] = out
    n_params = count_parameters(model)
    return outcome(ok, tokens_per_s=tok_s, mfu=mfu(training_flops_per_token(n_params), tok_s, peak), error=error,
                   precision=results["precision"], method=results["method"], first_loss=losses[0] if losses else None,
                   last_loss=losses[-1] if losses else None, train_runtime_s=results["train_runtime"],
                   tokens=results["num_tokens"], trainable_params=results["trainable_params"],
                   peak_memory_mb_in_run=results["peak_memory_mb"])


def check_lora_bf16(ctx: Context, model: str) -> dict:
    return _train_run(ctx, model, "lora-bf16", method="lora", precision="bf16")


def check_lora_fp16(ctx: Context, model: str) -> dict:
    return _train_run(ctx, model, "lora-fp16", method="lora", precision="fp16")


def check_qlora(ctx: Context, model: str) -> dict:
    return _train_run(ctx, model, "qlora", method="qlora", precision="bf16")


def _timed_micro_batches(model, collator, features: list[dict], reps: int) -> dict:
    """Collate + forward + backward of one micro-batch, `reps` times after a warm-up: loss, LoRA gradients, s."""
    import torch

    from finetune.speed.fast_trainer import target_token_loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = None
    for i in range(reps + 1):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        batch = {k: v.to(DEVICE, non_blocking=True) for k, v in collator(features).items()}
        with torch.autocast(DEVICE, dtype=torch.bfloat16):  # as Trainer runs bf16 mixed precision
            loss = target_token_loss(model, batch).loss
        loss.backward()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    grads = torch.cat([p.grad.float().flatten() for p in trainable if p.grad is not None])
    return {"loss": loss.item(), "grads": grads, "seconds": seconds, "peak_memory_mb": peak_memory_mb()}


def _packed_vs_padded(ctx: Context, model_key: str, attn: str, expected_mode: str, reps: int = 5) -> dict:
    """One LoRA micro-batch of the training rows, padded vs padding-free, on a model with attention `attn`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models import load_tokenizer
    from finetune.speed.batching import PaddedCollator, PaddingFreeCollator, padding_free_mode

    folder = ctx.model_dirs[model_key]
    tokenizer = load_tokenizer(str(folder))
    features = encoded_batch(ctx.rows, tokenizer, ctx.args.seq_len, ctx.args.batch_size)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, attn_implementation=attn,
                                                device_map=DEVICE)
    torch.manual_seed(0)  # lora_dropout 0: the two batchings must give the same numbers
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    mode = padding_free_mode(model)  # what FastSFTTrainer would pick, verified on this model
    if mode != expected_mode:
        return outcome(False, error=f"padding_free_mode picked {mode!r} for `{attn}`, expected {expected_mode!r}",
                       mode=mode)
    padded = _timed_micro_batches(model, PaddedCollator(tokenizer.pad_token_id), features, reps)
    packed = _timed_micro_batches(model, PaddingFreeCollator(mode), features, reps)
    tokens = sum(len(f["input_ids"]) for f in features)
    rel = abs(packed["loss"] - padded["loss"]) / abs(padded["loss"])
    cosine = float(torch.nn.functional.cosine_similarity(packed["grads"], padded["grads"], dim=0))
    ok = rel <= PACKED_LOSS_RTOL and cosine >= PACKED_GRAD_MIN_COSINE
    error = None if ok else (f"padding-free differs from padded: loss {packed['loss']:.5f} vs {padded['loss']:.5f} "
                             f"(relative {rel:.2e}, limit {PACKED_LOSS_RTOL}), gradient cosine {cosine:.4f} "
                             f"(limit {PACKED_GRAD_MIN_COSINE})")
    tok_s = tokens / packed["seconds"]
    n_params = count_parameters(model_key)
    return outcome(ok, tokens_per_s=tok_s, mfu=mfu(training_flops_per_token(n_params), tok_s, ctx.peaks.get("bf16")),
                   error=error, mode=mode, tokens_per_micro_batch=tokens, loss_padded=padded["loss"],
                   loss_packed=packed["loss"], loss_rel_diff=rel, grad_cosine=cosine,
                   padded_tokens_per_s=tokens / padded["seconds"],
                   speedup_vs_padded=padded["seconds"] / packed["seconds"],
                   peak_memory_mb_padded=padded["peak_memory_mb"], peak_memory_mb_packed=packed["peak_memory_mb"])


def check_padding_free(ctx: Context, model: str) -> dict:
    return _packed_vs_padded(ctx, model, "sdpa", "position_ids")


def check_flash_attn(ctx: Context, model: str) -> dict | str:
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        install = os.environ.get("GPU_CHECK_FLASH_ATTN_INSTALL", "not attempted (run through gpu_check.sh)")
        return f"flash-attn is not installed (pip install: {install})"
    return _packed_vs_padded(ctx, model, "flash_attention_2", "position_ids")


def check_merge(ctx: Context, model: str) -> dict:
    """merge_adapter's own check (merged vs base + adapter), in fp32 (judged) and bf16 (reported); and that the
    merged model's logits moved away from the base's (else an adapter that was dropped would pass)."""
    import torch

    from finetune.merge import check_sequences, merge_adapter
    from finetune.models import load_base_model, load_tokenizer

    run = ctx.runs[(model, "lora-bf16")]
    reports = {}
    for dtype in ("fp32", "bf16"):
        out = ctx.work / f"{model}-merged-{dtype}"
        reports[dtype] = merge_adapter(run, out, dtype=dtype)
        if dtype == "bf16":
            shutil.rmtree(out)
        free_cuda_memory()
    merged_dir = reports["fp32"].out_dir
    samples = check_sequences(load_tokenizer(str(merged_dir)))
    logits = {}
    for name, folder in (("base", ctx.model_dirs[model]), ("merged", merged_dir)):
        weights = load_base_model(str(folder), precision="fp32")
        with torch.inference_mode():
            logits[name] = [weights(input_ids=ids.to(DEVICE)).logits[0].float().cpu() for ids in samples]
        del weights
        free_cuda_memory()
    shutil.rmtree(merged_dir)
    effect = max(float((m - b).abs().max()) for m, b in zip(logits["merged"], logits["base"]))
    diff = reports["fp32"].max_abs_logit_diff
    ok = diff <= MERGE_FP32_ATOL and effect >= MERGE_MIN_EFFECT_RATIO * diff
    error = None if ok else (f"merged vs base + adapter: max |logit diff| {diff:.3g} (limit {MERGE_FP32_ATOL}); "
                             f"the adapter moved the logits by {effect:.3g} (must be >= {MERGE_MIN_EFFECT_RATIO:g}x)")
    return outcome(ok, error=error, fp32_max_abs_logit_diff=diff,
                   bf16_max_abs_logit_diff=reports["bf16"].max_abs_logit_diff, adapter_effect_max_abs_logit=effect)


def check_generate(ctx: Context, model: str) -> dict:
    """The compare view's path: ChatModel.from_run, then `stream` as the base, then as the fine-tuned model
    (greedy). New tokens are counted by a hook on the LM head (one call per produced token)."""
    import torch

    from finetune.inference import ChatModel

    chat = ChatModel.from_run(ctx.runs[(model, "lora-bf16")])
    picked: list = []
    hook = chat.model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, logits: picked.append(logits[0, -1].argmax()))
    prompt = [{"role": "user", "content": "Summarise what a LoRA adapter changes in a model."}]
    "".join(chat.stream(prompt, max_new_tokens=8, temperature=0))  # warm-up: CUDA kernels, allocator
    speeds, answers = {}, {}
    for adapter in (False, True):
        picked.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        "".join(chat.stream(prompt, adapter=adapter, max_new_tokens=ctx.args.new_tokens, temperature=0))
        seconds = time.perf_counter() - start
        speeds[adapter], answers[adapter] = len(picked) / seconds, [int(t) for t in picked]
    hook.remove()
    del chat
    n = len(answers[True])
    ok = n > 0 and len(answers[False]) > 0
    n_params = count_parameters(model)
    return outcome(ok, tokens_per_s=speeds[True], error=None if ok else "no token generated",
                   mfu=mfu(generation_flops_per_token(n_params), speeds[True], ctx.peaks.get("bf16")),
                   base_tokens_per_s=speeds[False], new_tokens=n, answers_differ=answers[True] != answers[False])


CHECK_FUNCTIONS: dict[str, Callable[[Context, Any], dict | str]] = {
    "auto-precision": check_auto_precision, "fp16-gradient": check_fp16_gradient,
    "lora-bf16": check_lora_bf16, "lora-fp16": check_lora_fp16,
    "qlora": check_qlora, "padding-free": check_padding_free, "flash-attn": check_flash_attn,
    "merge": check_merge, "generate": check_generate,
}


# ----------------------------------------------------------------------------- running and reporting
def run_check(ctx: Context, model: str | None, check: str, started: float) -> dict:
    """One check, isolated: a skip reason, a failure or an exception becomes the returned dict's status."""
    import torch

    row = {"check": check, "model": model, "status": "skipped", "tokens_per_s": None, "peak_memory_mb": None,
           "mfu": None, "seconds": 0.0, "error": None, "details": {}}
    elapsed = time.monotonic() - started
    need = NEEDS.get(check)
    if elapsed > ctx.args.budget_s:
        row["error"] = (f"time budget spent ({elapsed:.0f} s > --budget-s {ctx.args.budget_s:g}); rerun with "
                        f"--only {check} --models {model or ','.join(ctx.args.models)}")
    elif need and (model, need) not in ctx.runs:
        row["error"] = f"needs the run of {need} on {model}, which did not finish"
    else:
        free_cuda_memory()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        try:
            if model in ctx.build_errors:
                raise RuntimeError(f"the {model} model could not be built: {ctx.build_errors[model]}")
            result = CHECK_FUNCTIONS[check](ctx, model)
            if isinstance(result, str):  # a reason to skip, found by the check itself
                row["error"] = result
            else:
                ok = result.pop("ok")
                row.update(result, status="ok" if ok else "failed", peak_memory_mb=peak_memory_mb())
        except Exception as e:  # noqa: BLE001 - reported in the row; the other checks go on
            row.update(status="failed", error=f"{type(e).__name__}: {e}",
                       details={"traceback": traceback.format_exc(limit=8)})
        row["seconds"] = round(time.monotonic() - t0, 1)
        free_cuda_memory()
    print(f"[{time.monotonic() - started:5.0f} s] {check}{' on ' + model if model else ''}: {row['status']}"
          f"{' - ' + row['error'] if row['error'] else ''}", flush=True)
    return row


def environment() -> dict:
    import torch

    from finetune.train import library_versions

    props = torch.cuda.get_device_properties(0)
    versions = library_versions()
    if importlib.util.find_spec("flash_attn"):
        import flash_attn
        versions["flash_attn"] = flash_attn.__version__
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "flash_attn_install": os.environ.get("GPU_CHECK_FLASH_ATTN_INSTALL"), "versions": versions}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'check':<15}{'model':<14}{'status':<9}{'tok/s':>10}{'peak MB':>10}{'MFU':>8}{'s':>7}  note"]
    for r in rows:
        tok = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else "-"
        util = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        note = r["error"] or _key_detail(r)
        lines.append(f"{r['check']:<15}{r['model'] or '-':<14}{r['status']:<9}{tok:>10}{mem:>10}{util:>8}"
                     f"{r['seconds']:>7.1f}  {note}")
    return "\n".join(lines)


def _key_detail(row: dict) -> str:
    d = row["details"]
    if "speedup_vs_padded" in d:
        return (f"{d['mode']}: {d['speedup_vs_padded']:.2f}x padded ({d['padded_tokens_per_s']:.0f} tok/s), "
                f"loss rel diff {d['loss_rel_diff']:.1e}, grad cosine {d['grad_cosine']:.4f}")
    if "fp32_max_abs_logit_diff" in d:
        return (f"logit diff fp32 {d['fp32_max_abs_logit_diff']:.2g}, bf16 {d['bf16_max_abs_logit_diff']:.2g}; "
                f"adapter effect {d['adapter_effect_max_abs_logit']:.2g}")
    if "base_tokens_per_s" in d:
        return (f"base {d['base_tokens_per_s']:.0f} tok/s, {d['new_tokens']} tokens, "
                f"answers differ: {d['answers_differ']}")
    if "first_loss" in d:
        return f"loss {d['first_loss']:.3f} -> {d['last_loss']:.3f}"
    if "scale_2^10" in d:
        return f"off-target gradient mass kept at 2^10: {d['scale_2^10']['off_target_mass_kept']:.3f}"
    if "picked" in d:
        return f"auto -> {d['picked']} (compute capability {d['compute_capability']})"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("\n".join(describe_plan(args)), flush=True)
    if args.dry_run:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); this script checks the CUDA "
              "paths. Run it on a GPU machine, or pass --dry-run to print the plan only.", file=sys.stderr)
        return 2
    started = time.monotonic()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = _run(args, work, started)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _run(args: argparse.Namespace, work: Path, started: float) -> list[dict]:
    from finetune.demo import build_demo_tokenizer

    env = environment()
    peaks = {name: matmul_peak_flops(name) for name in ("bf16", "fp16")}
    print(f"{env['gpu']} (cc {env['compute_capability']}, CUDA {env['cuda']}); matmul peak: "
          + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in peaks.items()), flush=True)
    rows = synthetic_rows(build_demo_tokenizer(), args.steps * args.batch_size, args.seq_len)
    ctx = Context(args=args, work=work, peaks=peaks, model_dirs={}, rows=rows, runs={}, build_errors={})
    results = []
    for model, check in plan(args):
        if model is not None and model not in ctx.model_dirs and model not in ctx.build_errors:
            try:
                ctx.model_dirs[model] = save_model_folder(MODELS[model], work / f"{model}-base")
            except Exception as e:  # noqa: BLE001 - each of its checks reports it
                ctx.build_errors[model] = f"{type(e).__name__}: {e}"
            free_cuda_memory()
        results.append(run_check(ctx, model, check, started))
    total = time.monotonic() - started
    print("\n" + format_table(results) + f"\n\ntotal {total:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "total_seconds": total, "checks": results}
    args.out.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    sys.exit(main())
