"""Training throughput, side by side: the pad-to-512 tutorial, TRL SFTTrainer defaults, and ours.

    python -m benchmarks.train_throughput --quick          # 32 Alpaca rows, 1 epoch, < 5 min on 2 CPU cores
    python -m benchmarks.train_throughput --levers         # ours with each speed lever switched off in turn

Levers are switched through the run config (`padding_free`, `speed`, `speed_levers_off`), as a user would.

Same model (SmolLM2-135M-shaped Llama, random weights, built locally), same tokenizer (byte-level BPE
trained locally on the Alpaca rows), same rows in the same order, same LoRA (r=8, alpha 16, dropout
0.05 on q_proj/v_proj), same effective batch (2 x 4 accumulation), max length 512, same learning-rate
schedule (ours' defaults: 2e-4, cosine, 1 warmup step), seed 42. Each pipeline runs in a fresh
subprocess, so its peak RSS is its own.

Pipelines:
- tutorial: `tokenizer(..., padding="max_length", max_length=512)`, `Trainer` +
  `DataCollatorForLanguageModeling(mlm=False)`, TrainingArguments defaults (fp32); loss on every non-pad
  token (that is what the tutorial trains), so its loss is not compared.
- trl: `SFTTrainer` with SFTConfig defaults (bf16 autocast, gradient checkpointing, TRL collator,
  fused chunked LM head with entropy/accuracy metrics) on our tokenised rows (`input_ids` +
  `completion_mask`): loss = mean over answer tokens of the accumulated batch.
- ours: `finetune.train.train` with our defaults (the same loss).

Throughput is measured over `trainer.train()` (Trainer's `train_runtime`); target tokens are the answer
tokens (labels != -100 in our encoding), the same count for every pipeline. The last line printed is
one JSON object (see `summary`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALPACA = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"
ASSET_VERSION = 1  # bump when the model or tokenizer build changes
VOCAB_SIZE = 49152  # SmolLM2's; the model keeps it even if the BPE learns fewer merges on this corpus
MAX_LENGTH = 512
BATCH, ACCUMULATION = 2, 4
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
LEARNING_RATE, SCHEDULER, WARMUP_STEPS = 2e-4, "cosine", 1  # ours' defaults for a 4-step run
SEED = 42
LOSS_TOLERANCE = 0.02  # relative, per step: bf16 rounding + LoRA-dropout masks drawn over other shapes (RESULTS.md)


# ----------------------------------------------------------------------------- assets (built once, cached)
def assets_dir() -> Path:
    from finetune.demo import default_cache_dir

    return default_cache_dir() / f"bench-smollm2-135m-shape-v{ASSET_VERSION}"


def build_assets(folder: Path) -> Path:
    """Tokenizer trained on the Alpaca rows + a random-weight SmolLM2-135M-shaped Llama, saved to `folder`."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from finetune.demo import IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS
    from finetune.templates import CHATML_TEMPLATE

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    texts = [" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in rows]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=PAD_TOKEN,
                                        additional_special_tokens=[IM_START], chat_template=CHATML_TEMPLATE,
                                        model_max_length=2048, clean_up_tokenization_spaces=False)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                         pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN), dtype="float32")
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + "-", dir=folder.parent if folder.parent.exists() else None))
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder


# ----------------------------------------------------------------------------- shared data
def run_config(model_dir: Path, rows: int, output_dir: Path, **changes):
    from finetune.config import RunConfig

    base = dict(base_model=str(model_dir), dataset=str(ALPACA), max_rows=rows, eval_fraction=0.0,
                test_fraction=0.0, max_seq_length=MAX_LENGTH, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                lora_dropout=LORA["lora_dropout"], lora_target_modules=LORA["target_modules"], batch_size=BATCH,
                gradient_accumulation_steps=ACCUMULATION, num_train_epochs=1, logging_steps=1,
                learning_rate=LEARNING_RATE, seed=SEED, output_dir=str(output_dir))
    base.update(changes)
    steps = -(-rows // (BATCH * ACCUMULATION))
    base.setdefault("save_steps", steps)  # one checkpoint, at the end (TRL's default of 500 saves none here)
    return RunConfig(**base)


def encoded_examples(model_dir: Path, rows: int) -> tuple[list[dict], list[dict]]:
    """The training split exactly as ours builds it: (normalised examples, our encodings)."""
    from finetune.data import load_examples
    from finetune.models import load_tokenizer
    from finetune.templates import apply_template_choice, encode_example

    cfg = run_config(model_dir, rows, Path(tempfile.gettempdir()) / "unused")
    tokenizer = load_tokenizer(str(model_dir))
    apply_template_choice(tokenizer, cfg.chat_template)
    examples = load_examples(cfg).splits.train
    encodings = [encode_example(ex, tokenizer, max_seq_length=MAX_LENGTH) for ex in examples]
    return examples, encodings


def token_counts(encodings: list[dict]) -> dict[str, int]:
    return {"examples": len(encodings),
            "target_tokens": sum(sum(label != -100 for label in e["labels"]) for e in encodings),
            "tokens": sum(len(e["input_ids"]) for e in encodings)}


# ----------------------------------------------------------------------------- workers (one per subprocess)
def lora_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA)


def worker_tutorial(model_dir: Path, rows: int, out: Path, variant: str) -> dict:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    examples, _ = encoded_examples(model_dir, rows)
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template(ex["messages"], tokenize=False) for ex in examples]
    dataset = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True)))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora_config())
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUMULATION, num_train_epochs=1,
                             learning_rate=LEARNING_RATE, lr_scheduler_type=SCHEDULER, warmup_steps=WARMUP_STEPS,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=SEED,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train()
    return {"train_runtime": result.metrics["train_runtime"], "losses": step_losses(trainer.state.log_history)}


def worker_trl(model_dir: Path, rows: int, out: Path, variant: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    _, encodings = encoded_examples(model_dir, rows)
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"],
                                  "completion_mask": [int(label != -100) for label in e["labels"]]}
                                 for e in encodings])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    extra = {"gradient_checkpointing": False} if variant == "no_checkpointing" else {}
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                     num_train_epochs=1, max_length=MAX_LENGTH, learning_rate=LEARNING_RATE,
                     lr_scheduler_type=SCHEDULER, warmup_steps=WARMUP_STEPS, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, seed=SEED, disable_tqdm=True, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config())
    result = trainer.train()
    return {"train_runtime": result.metrics["train_runtime"], "losses": step_losses(trainer.state.log_history)}


# ours' variants: config changes only (finetune.speed's switches), nothing patched
OURS_VARIANTS = {
    "padded": {"padding_free": False}, "fp32": {"precision": "fp32"}, "checkpointing": {"gradient_checkpointing": True},
    "full_logits": {"speed_levers_off": ["target_head"]},  # the LM head over every position
    "lever_baseline": {"padding_free": False, "speed_levers_off": ["target_head"]},  # padded batches, full logits
    "plain_ce": {"speed_levers_off": ["chunked_loss"]},  # an fp32 copy of the logits + autograd's log-softmax
    "fp32_storage": {"speed_levers_off": ["half_frozen_weights"]},  # frozen linear weights kept fp32 (autocast casts)
    "mask_attention": {"speed_levers_off": ["segments"]},  # transformers' (T, T) packed mask through sdpa
    "torch_dropout": {"speed_levers_off": ["cpu_dropout"]},  # PyTorch's own masks (serial on non-Intel CPUs)
    "speed_off": {"speed": False},  # stock TRL SFTTrainer through our pipeline (our settings, TRL's data path)
}


def worker_ours(model_dir: Path, rows: int, out: Path, variant: str) -> dict:
    from finetune.train import train

    if variant == "threads1":  # one intra-op thread: on a shared 2-core box, 2 OpenMP threads can stall each other
        import torch

        torch.set_num_threads(1)
    result = train(run_config(model_dir, rows, out, **OURS_VARIANTS.get(variant, {})))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"train_runtime": result.results["train_runtime"], "losses": [x for x in losses if x is not None]}


WORKERS = {"tutorial": worker_tutorial, "trl": worker_trl, "ours": worker_ours}


def step_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry and "train_runtime" not in entry]


def run_worker(name: str, model_dir: Path, rows: int, variant: str) -> dict:
    """In this (fresh) process: train, then add wall time and peak RSS."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        result = WORKERS[name](model_dir, rows, Path(tmp) / "run", variant)
    result["wall_s"] = time.time() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def spawn(name: str, model_dir: Path, rows: int, variant: str = "") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--worker", name, "--variant", variant,
               "--rows", str(rows), "--model-dir", str(model_dir), "--result", f.name]
        env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"pipeline {name}/{variant or 'default'} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


# ----------------------------------------------------------------------------- report
def with_rates(result: dict, counts: dict) -> dict:
    t = result["train_runtime"]
    return {**result, "examples_s": counts["examples"] / t, "target_tok_s": counts["target_tokens"] / t,
            "tok_s": counts["tokens"] / t}


def median_run(runs: list[dict]) -> dict:
    """The run with the median train time (its own losses and RSS), plus the spread of all runs."""
    ordered = sorted(runs, key=lambda r: r["train_runtime"])
    pick = dict(ordered[len(ordered) // 2])
    pick["runtimes"] = [round(r["train_runtime"], 2) for r in runs]
    pick["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return pick


def losses_match(ours: list[float], trl: list[float]) -> tuple[bool, float]:
    if len(ours) != len(trl) or not ours:
        return False, float("inf")
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, trl))
    return worst <= LOSS_TOLERANCE, worst


def print_table(results: dict[str, dict]) -> None:
    print(f"{'pipeline':<26}{'train s':>9}{'wall s':>9}{'ex/s':>8}{'target tok/s':>14}{'tok/s':>9}{'peak RSS MB':>13}"
          f"  losses per step")
    for name, r in results.items():
        losses = " ".join(f"{x:.4f}" for x in r["losses"])
        print(f"{name:<26}{r['train_runtime']:>9.1f}{r['wall_s']:>9.1f}{r['examples_s']:>8.2f}"
              f"{r['target_tok_s']:>14.1f}{r['tok_s']:>9.1f}{r['peak_rss_mb']:>13.0f}  {losses}"
              f"   (runs: {r['runtimes']})")


def compare(rows: int, repeat: int, plan: list[tuple[str, str, str]]) -> dict[str, dict]:
    model_dir = build_assets(assets_dir())
    _, encodings = encoded_examples(model_dir, rows)
    counts = token_counts(encodings)
    print(f"model {model_dir}\nrows {rows}: {counts['examples']} examples, {counts['target_tokens']} target tokens, "
          f"{counts['tokens']} tokens; batch {BATCH} x {ACCUMULATION}; repeat {repeat} (median train time)",
          flush=True)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in plan}
    for _ in range(repeat):  # interleaved, so load from other users of the machine hits every pipeline alike
        for label, name, variant in plan:
            runs[label].append(spawn(name, model_dir, rows, variant))
            print(f"  {label}: {runs[label][-1]['train_runtime']:.1f} s", file=sys.stderr, flush=True)
    results = {label: with_rates(median_run(r), counts) for label, r in runs.items()}
    print_table(results)
    return results


N_PARAMS = 134_515_008  # the benchmark model's parameters (SmolLM2-135M's count)


def matmul_peak_gflops(dtype_name: str, size: int = 2048, reps: int = 8) -> float:
    """Best of `reps` square (size x size) matmuls in GFLOP/s, with every thread torch uses: this machine's ceiling."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(2):  # warm-up: thread pool, kernel selection
        a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def ceiling(results: dict[str, dict], peaks: dict[str, float]) -> dict:
    """Achieved GFLOP/s of ours (LoRA: ~4 x params FLOPs per token processed: forward 2N, backward through the
    activations 2N; the adapters' own gradients are negligible) and its fraction of each matmul peak."""
    achieved = 4 * N_PARAMS * results["ours"]["tok_s"] / 1e9
    return {"ours_gflops": round(achieved, 1), "matmul_peak_gflops": {k: round(v) for k, v in peaks.items()},
            "ceiling_fraction": {k: round(achieved / v, 3) for k, v in peaks.items()}}


def summary(results: dict[str, dict]) -> dict:
    ours, trl, tutorial = results["ours"], results["trl"], results["tutorial"]
    match, worst = losses_match(ours["losses"], trl["losses"])
    return {"ours_tok_s": round(ours["target_tok_s"], 1), "trl_tok_s": round(trl["target_tok_s"], 1),
            "tutorial_tok_s": round(tutorial["target_tok_s"], 1),
            "ratio_vs_trl": round(ours["target_tok_s"] / trl["target_tok_s"], 2),
            "ratio_vs_tutorial": round(ours["target_tok_s"] / tutorial["target_tok_s"], 2),
            "peak_rss_mb": {k: round(r["peak_rss_mb"]) for k, r in results.items()},
            "loss_match": match, "loss_max_rel_diff": round(worst, 5),
            "final_loss": {k: round(r["losses"][-1], 4) for k, r in results.items() if r["losses"]}}


MAIN_PLAN = [("tutorial", "tutorial", ""), ("trl", "trl", ""), ("ours", "ours", "")]
LEVER_PLAN = [("ours", "ours", ""), ("ours padded", "ours", "padded"), ("ours full-logits head", "ours", "full_logits"),
              ("ours neither (baseline)", "ours", "lever_baseline"), ("ours fp32", "ours", "fp32"),
              ("ours + grad checkpointing", "ours", "checkpointing"), ("trl", "trl", ""),
              ("trl no checkpointing", "trl", "no_checkpointing"), ("ours 1 thread", "ours", "threads1"),
              ("ours plain CE", "ours", "plain_ce"), ("ours fp32 frozen weights", "ours", "fp32_storage"),
              ("ours masked attention", "ours", "mask_attention"), ("ours torch dropout", "ours", "torch_dropout"),
              ("ours speed off (stock SFTTrainer)", "ours", "speed_off")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 rows, one run each (< 5 minutes on 2 cores)")
    parser.add_argument("--levers", action="store_true", help="ours with each lever off in turn, and TRL")
    parser.add_argument("--rows", type=int, default=None, help="training rows (default 32 quick, 64 otherwise)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per pipeline; the median is reported")
    parser.add_argument("--only", default=None,
                        help="with --levers: comma-separated labels of the lever plan to run (e.g. 'ours,ours fp32')")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_worker(args.worker, Path(args.model_dir), args.rows, args.variant)
        Path(args.result).write_text(json.dumps(result))
        return
    rows = args.rows or (32 if args.quick else 64)
    repeat = args.repeat or (1 if args.quick else 3)
    start = time.time()
    plan = LEVER_PLAN if args.levers else MAIN_PLAN
    if args.only:
        wanted = [label.strip() for label in args.only.split(",")]
        unknown = sorted(set(wanted) - {label for label, _, _ in plan})
        if unknown:
            parser.error(f"--only: unknown label(s) {unknown}; choose from {[label for label, _, _ in plan]}")
        plan = [step for step in plan if step[0] in wanted]
    print(f"load average at start {os.getloadavg()}", flush=True)
    results = compare(rows, repeat, plan)
    print(f"load average at end {os.getloadavg()}")
    peaks = {name: matmul_peak_gflops(name) for name in ("bf16", "fp32")}  # after the runs: no memory held then
    print(f"matmul peak (2048^2, best of 8): bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s")
    print(f"total {time.time() - start:.0f} s")
    if args.levers:
        print(json.dumps({**{k: round(r["target_tok_s"], 1) for k, r in results.items()},
                          "load_average": os.getloadavg()[0]}))
    else:
        print(json.dumps({**summary(results), **ceiling(results, peaks), "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
