"""Start `python app.py` on 127.0.0.1 (a free port, a temporary workspace, offline) for the app tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120  # importing gradio + torch on a busy 2-core CI machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(workspace: Path, log_path: Path, **extra_env: str):
    """Yield the app's URL while `python app.py` serves it, offline (plus `extra_env`); stop it afterwards."""
    port = free_port()
    env = {**os.environ, "FINETUNE_WORKSPACE": str(workspace), "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **extra_env}
    env.pop("SPACE_ID", None)
    with serve_app(env, port, log_path) as (url, _):
        yield url


@contextmanager
def serve_app(env: dict[str, str], port: int, log_path: Path):
    """Run `python app.py` with `env` (which sets GRADIO_SERVER_PORT=`port`), its output in `log_path`; yield
    (url, process) once it answers, and stop it with SIGTERM (then SIGKILL) afterwards."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, proc, log_path)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"app.py did not answer on {url} within {STARTUP_TIMEOUT_S} s:\n"
                       f"{log_path.read_text(errors='replace')}")
