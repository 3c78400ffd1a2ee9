"""Inference for the compare view: generation speed with the adapter on and off, the memory of one model
with a switchable adapter against two loaded models, and the compare view's two answers one after the other
(before) against both in one batched pass (after).

    python -m benchmarks.inference                 # 64 new tokens per answer, 3 prompts, ~3 minutes on 2 cores
    python -m benchmarks.inference --new-tokens 128 --prompts 5
    python -m benchmarks.inference --steps 30      # only ms per decoding step, 1 row / 2 rows stock / weight-major
    python -m benchmarks.inference --interleaved 3 # only the compare view, its three ways alternating, 3 rounds

Model: the SmolLM2-135M-shaped benchmark model of `train_throughput.py` (same cache) with a LoRA adapter
(r=8, alpha 16 on q_proj/v_proj, initialised with non-zero B so that "on" and "off" really differ).

What runs is the compare view's code path, `finetune.inference.ChatModel`:
- `one model`: `ChatModel(base, adapter)`; `adapter=False` disables the LoRA layers for that call;
- `two models`: `ChatModel(base, finetuned_path=merged)`: the base plus a second, merged copy (what the
  compare view would need without adapter switching, and what it does hold for a full fine-tune).
Each runs in a fresh subprocess, so its peak RSS is its own: it loads, answers every prompt with
`generate` and `stream`, adapter on and off, greedy (temperature 0), and reports tokens/s per mode.

The compare view, one model with the adapter, greedy, each in its own subprocess too:
- `compare_one_after_other` (before): `stream(adapter=False)`, then `stream(adapter=True)`;
- `compare_together` (after): `stream_both`, one batched `generate` with the adapter on row 1 only, its linear
  layers weight-major (`finetune.speed.decode_linears`);
- `compare_together_stock_linears`: the same with PyTorch's stock linear layers (`ChatModel(weight_major=False)`).
Per pane, from the moment the message is sent: time to its first token, its tokens, and tokens/s = its
tokens / time to its last token (what the pane's reader waits). Also the time until both panes have a
first token, and both panes' tokens / time until both are done.

New tokens are counted exactly by a forward hook on the LM head: generation runs it once per decoding step
(the prefill's call produces the first token); in the batched pass one call produces a token for each row,
and a pane's last token comes from call number `PaneText.tokens`. Tokens/s is new tokens / wall time of the
call (prefill included). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
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


def compare_worker(setup: str, model_dir: Path, n_prompts: int, new_tokens: int) -> dict:
    """The compare view's two answers per prompt, one after the other or together; per-pane timings."""
    from finetune.inference import ChatModel

    adapter, _ = adapter_assets(model_dir)
    chat = ChatModel(str(model_dir), adapter, tokenizer_path=model_dir,
                     weight_major=setup != "compare_together_stock_linears")
    steps: list[float] = []  # perf_counter() at each LM head call: one per decoding step
    chat.model.get_output_embeddings().register_forward_hook(lambda *_: steps.append(time.perf_counter()))
    answer = one_after_other if setup == "compare_one_after_other" else together
    answer(chat, prompts(1)[0], 4, steps)  # warm-up: first-call allocations, thread pools
    runs = [answer(chat, text, new_tokens, steps) for text in prompts(n_prompts)]
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "answers"}
    return {**medians, "answers": [run["answers"] for run in runs],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def one_after_other(chat, text: str, new_tokens: int, steps: list[float]) -> dict:
    """Before: the base answer streams, then the fine-tuned one (each pane's steps are its own)."""
    steps.clear()
    sent = time.perf_counter()
    panes = []
    for adapter in (False, True):
        first = len(steps)
        answer = "".join(chat.stream(text, adapter=adapter, max_new_tokens=new_tokens, temperature=0))
        panes.append((answer, steps[first:]))
    return pane_figures(sent, [(answer, len(own), own[0], own[-1]) for answer, own in panes])


def together(chat, text: str, new_tokens: int, steps: list[float]) -> dict:
    """After: `stream_both`, one step producing a token for both panes until each ends."""
    steps.clear()
    sent = time.perf_counter()
    *_, (base, tuned) = chat.stream_both(text, max_new_tokens=new_tokens, temperature=0)
    return pane_figures(sent, [(pane.text, pane.tokens, steps[0], steps[pane.tokens - 1]) for pane in (base, tuned)])


def pane_figures(sent: float, panes: list[tuple[str, int, float, float]]) -> dict:
    """(answer, tokens, first-token time, last-token time) per pane, base first -> the reported figures."""
    figures = {"both_first_token_s": max(first for _, _, first, _ in panes) - sent,
               "all_tok_s": sum(n for _, n, _, _ in panes) / (max(last for *_, last in panes) - sent)}
    for name, (_, n, first, last) in zip(("base", "finetuned"), panes):
        figures[f"{name}_first_token_s"] = first - sent
        figures[f"{name}_tok_s"] = n / (last - sent)
    figures["answers"] = [answer for answer, *_ in panes]
    return figures


COMPARE_SETUPS = ("compare_one_after_other", "compare_together", "compare_together_stock_linears")


# ----------------------------------------------------------------------------- A/B in one process
def interleaved_compare(model_dir: Path, n_prompts: int, new_tokens: int, rounds: int) -> dict:
    """The compare view's three ways (before; together, stock linear layers; together, weight-major) in one
    process on one model, alternating prompt by prompt, `rounds` times: load on a shared machine hits them alike.
    Medians over rounds and prompts of each figure of `pane_figures`."""
    from finetune.inference import ChatModel

    adapter, _ = adapter_assets(model_dir)
    chat = ChatModel(str(model_dir), adapter, tokenizer_path=model_dir)
    steps: list[float] = []
    chat.model.get_output_embeddings().register_forward_hook(lambda *_: steps.append(time.perf_counter()))
    ways = {"before": (one_after_other, True), "together stock": (together, False), "together": (together, True)}
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for round_ in range(rounds + 1):  # round 0 warms up
        for text in prompts(n_prompts):
            for way, (answer, weight_major) in ways.items():
                chat.weight_major = weight_major
                run = answer(chat, text, new_tokens if round_ else 4, steps)
                if round_:
                    runs[way].append(run)
    return {way: {key: statistics.median(run[key] for run in rs) for key in rs[0] if key != "answers"}
            | {"answers": [run["answers"] for run in rs]} for way, rs in runs.items()}


def report_interleaved(results: dict) -> None:
    before = results["before"]
    figures = [key for key in before if key != "answers"]
    print("compare view, interleaved in one process; medians (ratios are what to compare on a shared machine):")
    for key in figures:
        print(f"  {key:<24}" + "".join(f"  {way} {r[key]:8.3f}" for way, r in results.items())
              + "".join(f"  {way}/before {r[key] / before[key]:.2f}" for way, r in results.items() if r is not before))
    same = all(r["answers"] == before["answers"] for r in results.values())
    print(f"  same answers all ways: {same}")
    print(json.dumps({"over_before": {way: {k: round(r[k] / before[k], 2) for k in figures}
                                      for way, r in results.items() if r is not before},
                      "same_answers": same, "load_average": round(os.getloadavg()[0], 2)}))


# ----------------------------------------------------------------------------- one decoding step, A/B
STEP_VARIANTS = ("1 row", "2 rows stock", "2 rows weight-major")


def step_worker(model_dir: Path, rounds: int) -> dict:
    """Milliseconds per decoding step (model forward with the KV cache of one Alpaca prompt): one row; two rows
    (adapter off on row 0, on on row 1, as `stream_both` runs them) with PyTorch's stock linear layers; the same
    with `weight_major_linears`. The variants alternate step by step, `rounds` times, so that load on a shared
    machine hits them alike; medians. Also the LM head alone, `F.linear` against weight-major, 1 and 2 rows."""
    import torch

    from finetune.inference import BASE_ROW, ChatModel
    from finetune.speed.decode_linears import weight_major_linear, weight_major_linears

    adapter, _ = adapter_assets(model_dir)
    chat = ChatModel(str(model_dir), adapter, tokenizer_path=model_dir)
    model, text = chat.model, prompts(1)[0]
    states = {1: decode_state(chat, [text], None),
              2: decode_state(chat, [text, text], [BASE_ROW, model.active_adapter])}
    lever = {"1 row": False, "2 rows stock": False, "2 rows weight-major": True}
    head = model.get_output_embeddings().weight  # (V, C)
    heads = {f"head {how} {rows} row{'s' * (rows > 1)}": (fn, torch.randn(rows, head.shape[1]))
             for rows in (1, 2) for how, fn in (("F.linear", torch.nn.functional.linear),
                                                ("weight-major", weight_major_linear))}
    ms: dict[str, list[float]] = {key: [] for key in (*STEP_VARIANTS, *heads)}
    with torch.inference_mode():
        for _ in range(rounds + 2):  # the first two rounds warm up
            for variant in STEP_VARIANTS:
                with weight_major_linears(model) if lever[variant] else contextlib.nullcontext():
                    ms[variant].append(timed_step(model, states[1 if variant == "1 row" else 2]))
            for key, (fn, x) in heads.items():
                start = time.perf_counter()
                fn(x, head)
                ms[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values[2:]) for key, values in ms.items()}


def decode_state(chat, texts: list[str], adapter_names: list[str] | None) -> dict:
    """The prompt's KV cache and the next forward's inputs (one new token per row)."""
    import torch

    inputs = chat._prompt_batch(texts, None)  # (B, T), left-padded
    extra = {"adapter_names": adapter_names} if adapter_names else {}
    with torch.inference_mode():
        out = chat.model(**inputs, use_cache=True, **extra)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], dim=1)
    return {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": mask,
            "past_key_values": out.past_key_values, **extra}


def timed_step(model, state: dict) -> float:
    """One decoding step in milliseconds; the cache is cut back to the prompt afterwards."""
    start = time.perf_counter()
    model(**state, use_cache=True)
    elapsed = time.perf_counter() - start
    state["past_key_values"].crop(-1)
    return elapsed * 1e3


def report_steps(ms: dict) -> None:
    one = ms["1 row"]
    print("per decoding step, median ms (ratios are what to compare on a shared machine):")
    for key, value in ms.items():
        print(f"  {key:<28} {value:8.2f}" + (f"   x{value / one:.2f} of one row" if key in STEP_VARIANTS else ""))
    # Per pane, one after the other: each pane's tokens over both answers' steps (2 one-row steps per token);
    # together: one two-row step per token. Prefill left out.
    for variant in STEP_VARIANTS[1:]:
        print(f"  compare view per pane, {variant[7:]}: x{2 * one / ms[variant]:.2f} tokens/s of one after the other")
    print(json.dumps({"step_ms": {k: round(v, 3) for k, v in ms.items()},
                      "per_pane_over_one_after_other": {v[7:]: round(2 * one / ms[v], 2) for v in STEP_VARIANTS[1:]},
                      "load_average": round(os.getloadavg()[0], 2)}))


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
    parser.add_argument("--steps", type=int, metavar="ROUNDS",
                        help="only the per-step A/B of batched decoding's linear layers, ROUNDS steps per variant")
    parser.add_argument("--interleaved", type=int, metavar="ROUNDS",
                        help="only the compare view, its three ways alternating in one process, ROUNDS rounds")
    parser.add_argument("--worker", choices=["one_model", "two_models", *COMPARE_SETUPS], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = compare_worker if args.worker in COMPARE_SETUPS else worker
        result = run(args.worker, Path(args.model_dir), args.prompts, args.new_tokens)
        Path(args.result).write_text(json.dumps(result))
        return
    model_dir = bench.build_assets(bench.assets_dir())
    adapter_assets(model_dir)
    if args.steps:
        print(f"model {model_dir}; load average {os.getloadavg()[0]:.2f}", flush=True)
        report_steps(step_worker(model_dir, args.steps))
        return
    if args.interleaved:
        print(f"model {model_dir}; {args.prompts} prompts x {args.new_tokens} new tokens, greedy; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        report_interleaved(interleaved_compare(model_dir, args.prompts, args.new_tokens, args.interleaved))
        return
    print(f"model {model_dir}; {args.prompts} prompts x {args.new_tokens} new tokens, greedy; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {setup: spawn(setup, model_dir, args.prompts, args.new_tokens) for setup in ("one_model", "two_models")}
    for setup, r in results.items():
        rates = ", ".join(f"{k} {v:.1f}" for k, v in r["tok_s"].items())
        print(f"{setup:<11} load {r['load_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB; tok/s: {rates}; "
              f"on/off answers differ: {r['answers_differ']}; stream == generate: {r['stream_equals_generate']}")
    one, two = results["one_model"], results["two_models"]
    compare = {setup: spawn(setup, model_dir, args.prompts, args.new_tokens) for setup in COMPARE_SETUPS}
    before, after, stock = (compare[setup] for setup in COMPARE_SETUPS)
    figures = [key for key in before if key not in ("answers", "peak_rss_mb")]
    print(f"compare view, median of {args.prompts} prompts (before: one after the other; after: together; "
          "stock: together with stock linear layers):")
    for key in figures + ["peak_rss_mb"]:
        print(f"  {key:<24} before {before[key]:8.2f}  after {after[key]:8.2f}  stock {stock[key]:8.2f}  "
              f"after/before {after[key] / before[key]:.2f}  stock/before {stock[key] / before[key]:.2f}")
    print(f"  same answers all ways: {before['answers'] == after['answers'] == stock['answers']}")
    print(json.dumps({"tok_s": {s: {k: round(v, 1) for k, v in r["tok_s"].items()} for s, r in results.items()},
                      "peak_rss_mb": {s: round(r["peak_rss_mb"]) for s, r in {**results, **compare}.items()},
                      "rss_saved_mb": round(two["peak_rss_mb"] - one["peak_rss_mb"]),
                      "compare": {s: {k: round(r[k], 3) for k in figures} for s, r in compare.items()},
                      "compare_after_over_before": {k: round(after[k] / before[k], 2) for k in figures},
                      "compare_stock_linears_over_before": {k: round(stock[k] / before[k], 2) for k in figures},
                      "compare_same_answers": before["answers"] == after["answers"] == stock["answers"],
                      "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
