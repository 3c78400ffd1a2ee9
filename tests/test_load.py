"""Many users at once, through `python app.py` on localhost and gradio_client: a bounded burst of concurrent
requests (20 chats and 3 training submissions from 4 clients) all get an answer or a queue position, memory stays
bounded, and the figures are printed and written to tests/artifacts/load_test.json. Then a push through the app,
after which a planted HF token must appear in no file of the workspace, nothing the Hub received and nothing the
app printed."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil

from app_server import ROOT, free_port, serve_app
from hub_server import HubStandIn, Token
from test_app_client import App
from ui import build_app
from ui.compare_tab import CHAT_CONCURRENCY
from ui.context import create_context

ARTIFACT = ROOT / "tests" / "artifacts" / "load_test.json"
CLIENTS, CHATS_PER_CLIENT, TRAININGS = 4, 5, 3
MAX_RSS_GROWTH_MB = 150   # the app process after the burst vs before it (one chat model is cached, not four)
RUN_TIMEOUT_S = 150
ENV_TOKEN = "hf_PlantedEnvToken0123456789abcdefghXYZ"     # the machine's HF_TOKEN
TYPED_TOKEN = "hf_PlantedTypedToken0123456789abcdefgXYZ"  # what a user pastes in the token box
TINY = dict(base_model="demo", max_steps=2, learning_rate=2e-3, batch_size=2, gradient_accumulation_steps=1,
            max_seq_length=128, logging_steps=1)


@contextmanager
def app_with_hub(workspace: Path, log_path: Path, hub_url: str, hf_home: Path):
    """`python app.py` (a free port) talking to the Hub stand-in, with a planted HF_TOKEN; yields (url, process)."""
    port = free_port()
    env = {**os.environ, "FINETUNE_WORKSPACE": str(workspace), "GRADIO_SERVER_PORT": str(port),
           "HF_ENDPOINT": hub_url, "HF_TOKEN": ENV_TOKEN, "HF_HOME": str(hf_home), "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1", "FINETUNE_SHARED_RUNS": "0"}  # a server several people share: runs kept apart
    for name in ("SPACE_ID", "HF_HUB_OFFLINE", "FINETUNE_ALLOW_LOCAL_PATHS"):
        env.pop(name, None)
    with serve_app(env, port, log_path) as (url, proc):
        yield url, proc


def _train_and_poll(client) -> tuple[list, str]:
    """Start a training, then poll it at once (by the time every chat has answered, queued runs may have run)."""
    result = client.call("/start_training", **TINY)
    return result, client.call("/poll", run_id=result[1]["value"])[0]


class RssSampler(threading.Thread):
    """The peak resident memory of a process, sampled every 0.1 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self._stop_event = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self._stop_event.wait(0.1):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _mb(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


def _chat(client: App, i: int) -> tuple[float, str, str]:
    """One chat request; (seconds to the full answer, base answer, fine-tuned answer)."""
    start = time.time()
    base, tuned, *_ = client.call("/chat", message=f"Question {i}: how do I sort a list?", max_new_tokens=12,
                                  temperature=0, seed=0, system_prompt="")
    return time.time() - start, base[-1]["content"][0]["text"], tuned[-1]["content"][0]["text"]


def _wait_until_done(client: App, run_id: str) -> str:
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:
        status, *_ = client.call("/poll", run_id=run_id)
        if any(k in status for k in ("ft-ok", "ft-error")) or " was stopped" in status:
            return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not end within {RUN_TIMEOUT_S} s")


def test_chat_and_training_go_through_gradios_queue_with_concurrency_limits(tmp_path):
    ctx = create_context(tmp_path / "ws", start_worker=False)
    try:
        demo = build_app(ctx, hub_ok=False)
    finally:
        ctx.runs.close()
    by_name = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    for name in ("chat", "load_model", "test_prompts", "merge"):  # one model copy: one generation at a time
        fn = by_name[name]
        assert (fn.queue, fn.concurrency_limit, fn.concurrency_id) == (True, CHAT_CONCURRENCY, "model")
    assert CHAT_CONCURRENCY == 1
    assert (by_name["start_training"].queue, by_name["start_training"].concurrency_limit) == (True, 2)
    assert demo._queue.max_size == 256  # beyond that, new requests are told the queue is full


def test_a_burst_of_users_gets_answers_or_queue_positions_and_no_token_leaks(tmp_path, lora_run_dir):
    with HubStandIn({ENV_TOKEN: Token("alice"), TYPED_TOKEN: Token("bob")}) as hub, \
            app_with_hub(tmp_path / "workspace", tmp_path / "app.log", hub.url, tmp_path / "hf_home") as (url, proc):
        clients = [App(url) for _ in range(CLIENTS)]
        for client in clients:
            loaded, *_ = client.call("/load_model", run_id=None, path=str(lora_run_dir))
            assert "adapter switched off / on" in loaded, loaded
        for client in clients[:TRAININGS]:
            status, *_ = client.call("/load_data", source="Example dataset", example="python_qa.jsonl",
                                     base_model="demo")
            assert "32 train / 4 validation / 4 test" in status
        _chat(clients[0], 0)  # warm-up: the first generation allocates the model's working memory
        rss_before = psutil.Process(proc.pid).memory_info().rss
        sampler = RssSampler(proc.pid)
        sampler.start()

        start = time.time()
        with ThreadPoolExecutor(max_workers=CLIENTS * CHATS_PER_CLIENT + TRAININGS) as pool:
            chats = [pool.submit(_chat, clients[i % CLIENTS], i) for i in range(CLIENTS * CHATS_PER_CLIENT)]
            trainings = [pool.submit(_train_and_poll, clients[i]) for i in range(TRAININGS)]
            chat_results = [f.result(timeout=RUN_TIMEOUT_S) for f in chats]
            training_results, states = zip(*(f.result(timeout=RUN_TIMEOUT_S) for f in trainings))
        burst_s = time.time() - start
        rss_peak = sampler.stop()
        rss_after = psutil.Process(proc.pid).memory_info().rss

        # every chat got both answers; every training got a run and, unless it started at once, a queue position
        assert all(base and tuned for _, base, tuned in chat_results)
        runs = [(message, update["value"]) for message, update, *_ in training_results]
        assert all("queued." in message and run_id for message, run_id in runs), runs
        positions = sorted(int(m.split("It is number ")[1].split(" ")[0]) for m, _ in runs if "It is number" in m)
        assert positions == list(range(1, len(positions) + 1)) and len(positions) >= TRAININGS - 1, runs
        # the poll right after submitting shows each waiting run its place in the line, and only to its owner
        owners = {run_id: clients[i] for i, (_, run_id) in enumerate(runs)}
        assert sum("waiting in the queue: position" in s for s in states) >= TRAININGS - 1, states
        assert "in this session" in clients[3].call("/poll", run_id=runs[0][1])[0]

        growth_mb = _mb(rss_after - rss_before)
        latencies = sorted(seconds for seconds, _, _ in chat_results)
        figures = {"clients": CLIENTS, "chat_requests": len(chat_results), "training_submissions": len(runs),
                   "burst_seconds": round(burst_s, 2), "chat_latency_median_s": round(statistics.median(latencies), 2),
                   "chat_latency_max_s": round(latencies[-1], 2), "queue_positions": positions,
                   "app_rss_before_mb": _mb(rss_before), "app_rss_peak_mb": _mb(rss_peak),
                   "app_rss_after_mb": _mb(rss_after), "app_rss_growth_mb": growth_mb, "errors": 0}
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print("\nload test:", json.dumps(figures))
        assert growth_mb < MAX_RSS_GROWTH_MB, figures

        # the first run trains; the others are stopped: dropped from the queue, or (on a fast machine, where the
        # first run has finished by now) the one that took its turn gets SIGTERM
        first = next(run_id for message, run_id in runs if "It is number" not in message)
        for run_id, client in owners.items():
            if run_id != first:
                stop_message = client.call("/stop", run_id=run_id)[0]
                assert "stopped" in stop_message or "Stopping: the trainer saves" in stop_message, stop_message
        assert "finished" in _wait_until_done(owners[first], first)

        # a push through the app (HF_TOKEN is used locally before the typed one), and a push that fails
        pushed = owners[first].call("/push", run_id=first, repo="load-adapter", what="adapter", private=True,
                                    typed=TYPED_TOKEN)
        assert "Pushed: [alice/load-adapter]" in pushed, pushed
        failed = owners[first].call("/push", run_id=first, repo="x", what="merged", private=True, typed=TYPED_TOKEN)
        assert "merge the adapter first" in failed
        assert any(ENV_TOKEN in h for h in hub.authorization_headers)  # the planted token really was used
        hub_files = [content for repo in hub.repos.values() for commit in repo.commits
                     for content in commit.files.values()]

    app_output = (tmp_path / "app.log").read_text(errors="replace")
    files = [p for p in (tmp_path / "workspace").rglob("*") if p.is_file()]
    assert any(p.name == "log.txt" for p in files) and any(p.name == "run.yaml" for p in files)
    for token in (ENV_TOKEN, TYPED_TOKEN):
        assert token not in pushed + failed and token not in app_output
        leaked = [str(p) for p in files if token.encode() in p.read_bytes()]
        assert leaked == [], f"token written to {leaked}"
        assert not any(token.encode() in content for content in hub_files)

