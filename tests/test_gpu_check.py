"""benchmarks/gpu_check.{sh,py}: the parts that run without a GPU (arguments, plan, model shapes, MFU arithmetic,
synthetic data, the shell wrapper's --dry-run). The checks themselves need CUDA and run on a GPU machine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.memory import KNOWN_MODELS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load_gpu_check():
    """benchmarks/gpu_check.py by path: the benchmarks folder is not an installed package."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()

SMOLLM2_LINE = ("  smollm2-135m: 134,515,008 parameters (HuggingFaceTB/SmolLM2-135M shape: hidden 576, 30 layers, "
                "9 heads, 3 kv heads, intermediate 1536, vocab 49152, tied embeddings)")
ONE_B_LINE = ("  1b: 1,235,814,400 parameters (meta-llama/Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads, "
              "8 kv heads, intermediate 8192, vocab 128256, tied embeddings)")


# ----------------------------------------------------------------------------- arguments and plan
def test_defaults_select_both_models_and_every_check():
    args = gpu_check.parse_args([])
    assert (args.models, args.only, args.steps, args.seq_len, args.batch_size, args.new_tokens, args.budget_s,
            args.dry_run) == (["smollm2-135m", "1b"], None, 20, 1024, 8, 128, 330.0, False)
    assert args.out == ROOT / "benchmarks" / "out" / "gpu_check.json"
    per_model = ["lora-bf16", "merge", "generate", "lora-fp16", "qlora", "padding-free", "flash-attn"]
    assert gpu_check.plan(args) == ([(None, "auto-precision"), (None, "fp16-gradient")]
                                    + [("smollm2-135m", c) for c in per_model] + [("1b", c) for c in per_model])


def test_only_brings_the_run_that_merge_and_generate_need():
    args = gpu_check.parse_args(["--models", "1b", "--only", "generate, merge", "--steps", "5"])
    assert args.only == ["generate", "merge"] and args.steps == 5
    assert gpu_check.plan(args) == [("1b", "lora-bf16"), ("1b", "merge"), ("1b", "generate")]
    assert gpu_check.plan(gpu_check.parse_args(["--only", "qlora,auto-precision", "--models", "smollm2-135m"])) == [
        (None, "auto-precision"), ("smollm2-135m", "qlora")]


@pytest.mark.parametrize("argv, message", [
    (["--only", "lora-bf16,lora-bf32"], "argument --only: unknown check 'lora-bf32'; choose from lora-bf16,merge,"
                                        "generate,lora-fp16,qlora,padding-free,flash-attn,auto-precision,fp16-gradient"),
    (["--models", "7b"], "argument --models: unknown model '7b'; choose from smollm2-135m,1b"),
    (["--models", ","], "argument --models: unknown model (none given); choose from smollm2-135m,1b"),
    (["--steps", "1"], "argument --steps: must be at least 2 (got 1)"),
    (["--seq-len", "64"], "argument --seq-len: must be at least 128 (got 64)"),
])
def test_bad_arguments_name_the_option_and_the_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"gpu_check: error: {message}"


# ----------------------------------------------------------------------------- models, from their configs only
def test_model_shapes_match_the_real_models_parameter_counts():
    """Built on the meta device: shapes only, no 1B parameters allocated on the CPU."""
    assert gpu_check.count_parameters("smollm2-135m") == KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"].n_params
    assert gpu_check.count_parameters("1b") == KNOWN_MODELS["meta-llama/Llama-3.2-1B-Instruct"].n_params
    model = gpu_check.build_model(gpu_check.MODELS["1b"], "meta", eos_token_id=2, pad_token_id=0)
    assert next(model.parameters()).device.type == "meta" and model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert (model.config.head_dim, model.config.num_key_value_heads, model.config.eos_token_id,
            model.config.bos_token_id) == (64, 8, 2, None)


# ----------------------------------------------------------------------------- arithmetic
def test_mfu_counts_6n_per_trained_token_and_2n_per_generated_token():
    n = 134_515_008
    assert gpu_check.mfu(gpu_check.training_flops_per_token(n), 50_000.0, 800e12) == pytest.approx(
        6 * n * 50_000 / 800e12, rel=1e-12)  # 0.0504
    assert gpu_check.mfu(gpu_check.generation_flops_per_token(n), 300.0, 800e12) == pytest.approx(
        2 * n * 300 / 800e12, rel=1e-12)
    assert gpu_check.mfu(6.0 * n, 50_000.0, None) is None
    assert gpu_check.mfu(6.0 * n, None, 800e12) is None


def test_steady_throughput_leaves_the_first_step_out():
    records = [{"step": 1, "num_tokens": 5000, "elapsed_s": 9.0},  # step 1: CUDA warm-up inside
               {"step": 2, "num_tokens": 10200, "elapsed_s": 9.5},
               {"step": 3, "num_tokens": 15000, "elapsed_s": 10.0, "loss": 1.0}]
    assert gpu_check.steady_tokens_per_s(records) == pytest.approx((15000 - 5000) / 1.0)
    assert gpu_check.steady_tokens_per_s(records[:1]) is None
    assert gpu_check.steady_tokens_per_s([{"num_tokens": None, "elapsed_s": 1.0}] * 3) is None


# ----------------------------------------------------------------------------- data
def test_synthetic_rows_are_distinct_mixed_lengths_within_the_budget():
    from finetune.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    rows = gpu_check.synthetic_rows(tokenizer, 16, 256)
    assert len(rows) == 16 and len({r["completion"] for r in rows}) == 16
    assert rows[0]["prompt"] == "Passage 0: continue the text."
    batch = gpu_check.encoded_batch(rows, tokenizer, 256, 8)
    lengths = [len(f["input_ids"]) for f in batch]
    assert len(batch) == 8 and all(64 <= n <= 256 for n in lengths) and len(set(lengths)) > 4
    assert all(len(f["labels"]) == len(f["input_ids"]) and any(t != -100 for t in f["labels"]) for f in batch)
    assert gpu_check.synthetic_rows(tokenizer, 16, 256) == rows  # seeded


# ----------------------------------------------------------------------------- entry points without a GPU
def test_dry_run_prints_the_plan(capsys):
    assert gpu_check.main(["--dry-run", "--models", "smollm2-135m", "--only", "merge", "--steps", "10"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "GPU acceptance check, plan:",
        "  matmul peak: bf16 and fp16 GEMM (the MFU denominators)",
        "  training: 10 steps x 8 examples of up to 1024 tokens; generation: 128 new tokens per answer; "
        "time budget 330 s",
        SMOLLM2_LINE,
        "  - lora-bf16 on smollm2-135m",
        "  - merge on smollm2-135m",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_without_cuda_it_says_so_and_exits_2(capsys):
    assert gpu_check.main(["--models", "1b", "--only", "qlora"]) == 2
    assert capsys.readouterr().err == (
        "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); this script checks the CUDA paths. "
        "Run it on a GPU machine, or pass --dry-run to print the plan only.\n")


def test_shell_wrapper_has_valid_syntax_and_runs_the_dry_run_from_anywhere(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--models", "1b", "--only", "qlora"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] in ("flash-attn: not attempted (--dry-run or --help)",
                                           "flash-attn: already installed")
    assert done.stdout.splitlines()[1:] == [
        "GPU acceptance check, plan:",
        "  matmul peak: bf16 and fp16 GEMM (the MFU denominators)",
        "  training: 20 steps x 8 examples of up to 1024 tokens; generation: 128 new tokens per answer; "
        "time budget 330 s",
        ONE_B_LINE,
        "  - qlora on 1b",
    ]
    assert not (tmp_path / "benchmarks").exists()  # a dry run writes nothing
