"""Inference for the compare view: generation speed with the adapter on and off, and the memory of one model
with a switchable adapter against two loaded models.

    python -m benchmarks.inference                 # 64 new tokens per answer, 3 prompts, ~2 minutes on 2 cores
    python -m benchmarks.inference --new-tokens 128 --prompts 5

Model: the SmolLM2-135M-shaped benchmark model of `train_throughput.py` (same cache) with a LoRA adapter
(r=8, alpha 16 on q_proj/v_proj, initialised with non-zero B so that "on" and "off" really differ).

What runs is the compare view's code path, `finetune.inference.ChatModel`:
- `one model`: `ChatModel(base, adapter)`; `adapter=False` disables the LoRA layers for that call;
- `two models`: `ChatModel(base, finetuned_path=merged)`: the base plus a second, merged copy (what the
  compare view would need without adapter switching, and what it does hold for a full fine-tune).
Each runs in a fresh subprocess, so its peak RSS is its own: it loads, answers every prompt with
`generate` and `stream`, adapter on and off, greedy (temperature 0), and reports tokens/s per mode.

New tokens are counted exactly by a forward hook on the LM head: generation runs it once per produced
token (the prefill's call produces the first). Tokens/s is new tokens / wall time of the call (prefill
included). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import train_throughput as bench  # the same model and tokenizer, built once and cached

ADAPTER_VERSION = 1  # bump when the adapter build changes
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def adapter_assets(model_dir: Path) -> tuple[Path, Path]:
    """(adapter folder, merged-model folder) for the benchmark model, built once next to it."""
    root = model_dir.parent / f"{model_dir.name}-inference-v{ADAPTER_VERSION}"
    adapter, merged = root / "adapter", root / "merged"
    if (merged / "model.safetensors").is_file():
        return adapter, merged
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **LORA))
    tmp = Path(tempfile.mkdtemp(prefix=root.name + "-", dir=root.parent))
    model.save_pretrained(tmp / "adapter")
    model.merge_and_unload().save_pretrained(tmp / "merged")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for folder in ("adapter", "merged"):
        tokenizer.save_pretrained(tmp / folder)
    os.replace(tmp, root)
    return adapter, merged


def prompts(n: int) -> list[str]:
    rows = json.loads(bench.ALPACA.read_text(encoding="utf-8"))[:n]
    return [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")) for r in rows]


# ----------------------------------------------------------------------------- worker (one per subprocess)
def worker(setup: str, model_dir: Path, n_prompts: int, new_tokens: int) -> dict:
    from finetune.inference import ChatModel

    adapter, merged = adapter_assets(model_dir)
    start = time.time()
    if setup == "one_model":
        chat = ChatModel(str(model_dir), adapter, tokenizer_path=model_dir)
    else:
        chat = ChatModel(str(model_dir), finetuned_path=merged, tokenizer_path=model_dir)
    load_s = time.time() - start
    heads = [chat.model.get_output_embeddings()]
    if chat._finetuned is not None:
        heads.append(chat._finetuned.get_output_embeddings())
    calls = [0]
    for head in heads:
        head.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    texts = prompts(n_prompts)
    chat.generate(texts[0], max_new_tokens=4, temperature=0)  # warm-up: first-call allocations, thread pools
    rates: dict[str, list[float]] = {}
    answers: dict[str, list[str]] = {}
    for text in texts:
        for adapter_on in (True, False):
            for how in ("generate", "stream"):
                calls[0] = 0
                t = time.perf_counter()
                if how == "generate":
                    answer = chat.generate(text, adapter=adapter_on, max_new_tokens=new_tokens, temperature=0)
                else:
                    answer = "".join(chat.stream(text, adapter=adapter_on, max_new_tokens=new_tokens, temperature=0))
                elapsed = time.perf_counter() - t
                key = f"{how} adapter {'on' if adapter_on else 'off'}"
                rates.setdefault(key, []).append(calls[0] / elapsed)
                answers.setdefault(key, []).append(answer)
    return {"load_s": load_s, "tok_s": {k: statistics.median(v) for k, v in rates.items()},
            "answers_differ": answers["generate adapter on"] != answers["generate adapter off"],
            "stream_equals_generate": all(answers[f"stream adapter {s}"] == answers[f"generate adapter {s}"]
                                          for s in ("on", "off")),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def spawn(setup: str, model_dir: Path, n_prompts: int, new_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.inference", "--worker", setup, "--model-dir", str(model_dir),
               "--prompts", str(n_prompts), "--new-tokens", str(new_tokens), "--result", f.name]
        env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=bench.ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"inference worker {setup} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3, help="Alpaca instructions to answer (default 3)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per answer (default 64)")
    parser.add_argument("--worker", choices=["one_model", "two_models"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, Path(args.model_dir), args.prompts, args.new_tokens)
        Path(args.result).write_text(json.dumps(result))
        return
    model_dir = bench.build_assets(bench.assets_dir())
    adapter_assets(model_dir)
    print(f"model {model_dir}; {args.prompts} prompts x {args.new_tokens} new tokens, greedy; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {setup: spawn(setup, model_dir, args.prompts, args.new_tokens) for setup in ("one_model", "two_models")}
    for setup, r in results.items():
        rates = ", ".join(f"{k} {v:.1f}" for k, v in r["tok_s"].items())
        print(f"{setup:<11} load {r['load_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB; tok/s: {rates}; "
              f"on/off answers differ: {r['answers_differ']}; stream == generate: {r['stream_equals_generate']}")
    one, two = results["one_model"], results["two_models"]
    print(json.dumps({"tok_s": {s: {k: round(v, 1) for k, v in r["tok_s"].items()} for s, r in results.items()},
                      "peak_rss_mb": {s: round(r["peak_rss_mb"]) for s, r in results.items()},
                      "rss_saved_mb": round(two["peak_rss_mb"] - one["peak_rss_mb"]),
                      "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
