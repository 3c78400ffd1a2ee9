"""Data preparation at scale: rows/s and peak memory of `preview` and of full preparation, 10k to 1M rows.

    python -m benchmarks.data_scale                          # 10k, 100k and 1M rows (the 1M point takes long)
    python -m benchmarks.data_scale --sizes 10000 100000     # the quick points only

Rows are Alpaca rows from tests/fixtures/datasets/alpaca_en_demo.json (60 rows, ~900 bytes each) repeated with
the row index in the instruction, so that de-duplication keeps every one; the 1M-row file is ~0.9 GB of JSON
lines. The tokenizer is the demo model's (`base_model: demo`, its ChatML template), max_seq_length 1024.

Each measurement runs in a fresh subprocess with an empty data cache (`FINETUNE_DATA_CACHE`), so its peak
memory is its own:
- preview: `finetune.prepare.preview_data` (what `python -m finetune preview` runs): the first 2,000 rows.
- prepare: `finetune.prepare.prepare_data` (what training runs): every row read, normalised, de-duplicated,
  encoded (`datasets.map` in one process per core) and split, then `dataset("train")` built.
- prepare again: the same in another fresh process, with the cache the previous one left (a second run or a
  resume).
Peak memory is sampled every 0.2 s from /proc/PID/smaps_rollup over the process and its descendants (the
encoding workers): the largest sum of RSS (forked workers' pages shared with their parent counted once per
process: an upper bound) and of PSS (shared pages divided among their sharers), each at least the process's
own `ru_maxrss`, which is also reported; pages of memory-mapped cache files count while they are resident.
Time is wall-clock from the call to its return, after imports. The last line printed is one JSON object with
every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "datasets" / "alpaca_en_demo.json"
SIZES = (10_000, 100_000, 1_000_000)
MODES = ("preview", "prepare", "prepare again")
TARGETS = "full preparation of 1M rows under 3 GB peak RSS; preview of 1M rows under 10 s; cost linear in rows"


def write_rows(path: Path, n: int) -> Path:
    """n Alpaca rows as JSON lines, each made unique by its index; reused if already written."""
    if path.is_file():
        return path
    base = json.loads(FIXTURE.read_text(encoding="utf-8"))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = dict(base[i % len(base)])
            row["instruction"] = f"[{i}] {row['instruction']}"
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------- the measured child

class TreeRss:
    """Largest sums of RSS and of PSS over this process and its descendants, sampled in a thread (bytes). Forked
    workers share their parent's pages: the RSS sum counts those once per process, PSS divides them."""

    def __init__(self, every: float = 0.2):
        self.peak = self.peak_pss = 0
        self._every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            sizes = [_memory(pid) for pid in _tree(os.getpid())]
            self.peak = max(self.peak, sum(rss for rss, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(pss for _, pss in sizes))
            self._stop.wait(self._every)


def _tree(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("Rss", "Pss:"))}
        return fields.get("Rss", 0), fields.get("Pss", 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


def child(mode: str, path: str) -> dict:
    from finetune.config import RunConfig
    from finetune.prepare import prepare_data, preview_data

    config = RunConfig(base_model="demo", dataset=path, max_seq_length=1024)
    with TreeRss() as rss:
        start = time.perf_counter()
        if mode == "preview":
            prepared = preview_data(config)
        else:
            prepared = prepare_data(config)
            prepared.dataset("train")
        seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = prepared.examples.rows_read
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "peak_rss_mb": round(max(rss.peak, own) / 2**20), "peak_pss_mb": round(max(rss.peak_pss, own) / 2**20),
            "own_peak_rss_mb": round(own / 2**20),
            "encoded": sum(len(encs) for encs in prepared.encoded.values())}


# ---------------------------------------------------------------------------- the driver

def measure(mode: str, path: Path, cache: Path) -> dict:
    env = {**os.environ, "FINETUNE_DATA_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_scale", "--child", mode, str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {path.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "finetune-data-scale",
                        help="where the synthetic files are written (and kept for the next run)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"targets: {TARGETS}")
    print("| rows | file MB | mode | seconds | rows/s | peak RSS MB (sum) | peak PSS MB (sum) | own peak RSS MB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        path = write_rows(args.workdir / f"alpaca_{n}.jsonl", n)
        with tempfile.TemporaryDirectory(prefix="cache-", dir=args.workdir) as cache:
            for mode in args.modes:
                result = {"size": n, "mode": mode, **measure(mode, path, Path(cache))}
                results.append(result)
                print(f"| {n:,} | {path.stat().st_size / 1e6:.0f} | {mode} | {result['seconds']} | "
                      f"{result['rows_per_s']:,} | {result['peak_rss_mb']:,} | {result['peak_pss_mb']:,} | "
                      f"{result['own_peak_rss_mb']:,} |", flush=True)
    load = os.getloadavg()
    print(json.dumps({"results": results, "cores": len(os.sched_getaffinity(0)), "load_average": load}))


if __name__ == "__main__":
    main()
