"""Run manager: run folders, a FIFO training queue, one training subprocess at a time, stop, status.

The app (and anything else that wants to start runs in the background) goes through `RunManager`;
it never imports gradio. A run is a folder `<workspace>/runs/<unguessable id>/` laid out as
`finetune.run_folder` describes: the config the subprocess trains from (no secrets), its status, everything
`finetune.train.train` writes, and the manager's own files:

    owner.json     who started the run (the local user, a browser session id or a Hub user) and when
    launch.json    how many processes train it (a resumed run launches the same way)
    input/         the dataset file, copied in under a sanitised name (uploads, pasted rows, examples)
    log.txt        stdout + stderr of `python -m finetune train <config>`
    stop_requested present while a stop the manager asked for is pending

The status is queued | running | stopping | finished | stopped | failed (+ pid, error): the trainer writes
running/finished/stopped/failed itself, the manager writes queued/stopping and the failure of a process that
died without saying so.

Training runs as a subprocess (argument list, never a shell) in its own session, so an out-of-memory
error or a crash cannot take the app down, and a restarted app finds every run on disk again.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .errors import FinetuneError
from .hub import environment_with_token
from .run_folder import CONFIG_FILE, RunFolder, folder_bytes, read_json_object, write_json_atomic

log = logging.getLogger(__name__)

WORKSPACE_ENV = "FINETUNE_WORKSPACE"
# Disk hygiene: finished/stopped/failed runs older than this many days, then the oldest ones while the runs
# folder is over this many GB (1 GB = 1e9 bytes), are deleted at start and after each run. Unset: keep all.
MAX_RUN_AGE_ENV = "FINETUNE_MAX_RUN_AGE_DAYS"
MAX_WORKSPACE_ENV = "FINETUNE_MAX_WORKSPACE_GB"
DEFAULT_WORKSPACE = "./workspace"
SPACE_STORAGE = Path("/data")  # a Space's persistent storage, when it has some
ACTIVE_STATES = ("queued", "running", "stopping")
DONE_STATES = ("finished", "stopped", "failed")
LOG_TAIL_LINES = 30
# Seconds between SIGTERM (graceful: the trainer saves and marks the run "stopped") and SIGKILL.
DEFAULT_STOP_TIMEOUT_S = 120.0
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


class RunNotFound(FinetuneError):
    """No run with this id belongs to the caller (the message never says whether it exists for someone else)."""


def workspace_from_env() -> Path:
    """`$FINETUNE_WORKSPACE`; else, in a Space with persistent storage, `/data/workspace`; else `./workspace`."""
    if os.environ.get(WORKSPACE_ENV):
        return Path(os.environ[WORKSPACE_ENV]).expanduser().resolve()
    if os.environ.get("SPACE_ID") and os.access(SPACE_STORAGE, os.W_OK):
        return SPACE_STORAGE / "workspace"
    return Path(DEFAULT_WORKSPACE).resolve()


@dataclass(frozen=True)
class Retention:
    """How long finished runs are kept: by age (days) and by the runs folder's total size (bytes)."""
    max_age_days: float | None = None
    max_total_bytes: int | None = None

    @property
    def active(self) -> bool:
        return self.max_age_days is not None or self.max_total_bytes is not None

    @classmethod
    def from_env(cls) -> Retention:
        """From $FINETUNE_MAX_RUN_AGE_DAYS and $FINETUNE_MAX_WORKSPACE_GB; a bad value is a FinetuneError."""
        age, size = (_positive_env(name) for name in (MAX_RUN_AGE_ENV, MAX_WORKSPACE_ENV))
        return cls(max_age_days=age, max_total_bytes=None if size is None else int(size * 1e9))


def _positive_env(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise FinetuneError(f"${name} must be a positive number (got {raw!r}); unset it to keep every run")
    return value


def safe_filename(name: str, *, default: str = "upload") -> str:
    """A file name that can only live inside the folder it is joined to.

    Keeps the last path component (of `/` or `\\` paths), replaces anything but letters, digits, `.`,
    `-` and `_`, drops leading dots (no hidden files, no `..`) and caps the length at 100 characters.
    """
    base = str(name).replace("\\", "/").rstrip("/").split("/")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    if len(base) > 100:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: 100 - len(ext) - 1] + "." + ext) if dot and len(ext) <= 10 else base[:100]
    return base if base.strip("_") else default


def copy_into(folder: Path, source: Path, name: str | None = None) -> Path:
    """Copy `source` into `folder` under `safe_filename(name or source.name)`; never writes outside `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    target = (folder / safe_filename(name or source.name)).resolve()
    if target.parent != folder.resolve():  # belt and braces: safe_filename already rules this out
        raise FinetuneError(f"refusing to write {name!r} outside {folder}")
    shutil.copyfile(source, target)
    return target


# ============================================================================ what callers get back

@dataclass
class RunStatus:
    run_id: str
    run_dir: Path
    state: str                          # queued | running | stopping | finished | stopped | failed
    created: float                      # Unix time
    queue_position: int | None = None   # 1 = next to start; None when not queued
    error: str | None = None
    log_tail: str = ""
    metrics: list[dict] = field(default_factory=list)   # the metrics records so far
    results: dict | None = None                         # the final results, once written
    total_steps: int | None = None                      # optimizer steps the run will take (estimate)
    config: RunConfig | None = None

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    @property
    def step(self) -> int:
        return max((m.get("step") or 0 for m in self.metrics), default=0)

    @property
    def final_dir(self) -> Path | None:
        """adapter/ or model/, once the run saved one."""
        return RunFolder(self.run_dir).final_dir


@dataclass
class RunSummary:
    run_id: str
    state: str
    created: float
    base_model: str
    method: str
    dataset: str
    train_loss: float | None
    has_weights: bool  # adapter/ or model/ exists: usable in Compare and Export

    @property
    def label(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))
        loss = f", loss {self.train_loss:.3f}" if self.train_loss is not None else ""
        return f"{when} · {self.base_model} · {self.method} · {self.dataset} · {self.state}{loss} · {self.run_id[:6]}"


# ============================================================================ small file helpers

def tail(path: Path, lines: int = LOG_TAIL_LINES, *, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a text file (reads at most `max_bytes` from its end). Progress bars
    redraw with carriage returns: only the last redraw of each line is kept."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
            for line in data.split("\n")]
    return "\n".join(kept[-lines - 1:]).strip("\n") if kept else ""


def train_command(python: str, config_file: str | Path, num_processes: int = 1) -> list[str]:
    """The argument list that trains `config_file`: the CLI itself, or through `accelerate launch` (data parallel
    over `num_processes` GPUs; only its main process writes the run folder)."""
    if num_processes > 1:
        return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
                "-m", "finetune", "train", str(config_file)]
    return [python, "-m", "finetune", "train", str(config_file)]


def estimate_total_steps(config: RunConfig, n_train: int) -> int:
    """Optimizer steps of a run on `n_train` training examples (one process): what the progress bar counts to."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = max(1, math.ceil(n_train / (config.batch_size * config.gradient_accumulation_steps)))
    return max(1, math.ceil(config.num_train_epochs * per_epoch))


def _count_lines(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _pid_alive(pid: int | None, run_dir: Path) -> bool:
    """Whether `pid` is a live (not zombie) process training this run (its command line names the run folder)."""
    if not pid:
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return any(run_dir.name in part for part in proc.cmdline())
    except Exception:  # psutil.NoSuchProcess, AccessDenied, ...: not ours
        return False


# ============================================================================ the manager

class RunManager:
    """Creates run folders, queues runs (FIFO), trains one at a time in a subprocess, stops and reports them.

    Thread-safe; one manager per workspace per process. A daemon thread starts the next queued run as
    soon as the current one ends, and turns a process that died without a final status into `failed`
    with the last log lines.
    """

    def __init__(self, workspace: str | Path, *, python: str = sys.executable,
                 stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S, poll_interval_s: float = 0.5,
                 start_worker: bool = True, retention: Retention | None = None, shared: bool = False):
        self.workspace = Path(workspace).expanduser().resolve()
        self.runs_dir = self.workspace / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self._lock = threading.RLock()
        self._queue: deque[str] = deque()
        self._hub_tokens: dict[str, str] = {}  # run id → a visitor's Hub token, until the run starts (memory only)
        self._active: str | None = None           # the run whose process is (or may be) alive
        self._proc: subprocess.Popen | None = None
        self._kill_at: float | None = None        # time.time() when a stopping run gets SIGKILL
        self._closed = threading.Event()
        self.retention = retention or Retention()
        # every caller sees every run (one local user, or a team that shares its runs); else only its own.
        # The app decides this from the deployment: ui.context.OwnershipPolicy
        self.shared = shared
        self._recover()
        self.apply_retention()
        self._worker = None
        if start_worker:
            self._worker = threading.Thread(target=self._work, name="finetune-run-queue", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ public API
    def submit(self, config: RunConfig, owner: str, *, dataset_file: str | Path | None = None,
               dataset_name: str | None = None, num_processes: int = 1, hub_token: str | None = None) -> str:
        """Create a run folder for `owner`, write its config and queue it; return the run id.

        `dataset_file` (an upload, pasted rows saved to a file, a bundled example) is copied into the
        run's `input/` folder under a sanitised `dataset_name` and the config points at the copy.
        `num_processes` > 1 trains data-parallel through `accelerate launch` (recorded in launch.json, so a
        resumed run launches the same way). `hub_token` (a signed-in visitor's, in a Space) is what the training
        process loads private or gated Hub repos with; it is held in memory until the run starts, never written.
        """
        if num_processes < 1:
            raise FinetuneError(f"the number of processes must be at least 1 (got {num_processes})")
        if not owner:
            raise FinetuneError("a run needs an owner (the session or user that started it)")
        run_id = secrets.token_urlsafe(18)  # 144 random bits: unguessable, URL- and path-safe
        run_dir = self.runs_dir / run_id
        run_dir.mkdir()
        run = RunFolder(run_dir)
        write_json_atomic(run.owner_file, {"owner": owner, "created": time.time()})
        write_json_atomic(run.launch_file, {"num_processes": int(num_processes)})
        if dataset_file is not None:
            copied = copy_into(run.input_dir, Path(dataset_file), dataset_name)
            config = config.replace(dataset=str(copied))
        config = config.replace(output_dir=str(run_dir))
        run.write_config(config)
        with self._lock:
            run.write_status({"state": "queued", "time": time.time()})
            self._queue.append(run_id)
            if hub_token:
                self._hub_tokens[run_id] = hub_token
        self.pump()
        return run_id

    def status(self, run_id: str, owner: str) -> RunStatus:
        run_dir = self.run_dir(run_id, owner)
        self.pump()
        with self._lock:
            state, info = self._state(run_id, run_dir)
            position = self._queue.index(run_id) + 1 if run_id in self._queue else None
        run = RunFolder(run_dir)
        config = self._config(run_dir)
        metrics = run.read_metrics()
        results = run.read_results()
        total = info.get("total_steps") or self._total_steps(run_dir, config)
        if results and results.get("global_step") and state == "finished":
            total = results["global_step"]  # early stopping may end before the planned total: a full bar
        # (a stopped or failed run keeps the planned total: its bar shows how far it got)
        return RunStatus(run_id=run_id, run_dir=run_dir, state=state, created=self._created(run_dir),
                         queue_position=position, error=info.get("error"), log_tail=tail(run.log_file),
                         metrics=metrics, results=results, total_steps=total, config=config)

    def resume(self, run_id: str, owner: str) -> str:
        """Queue a failed or stopped run again in its own folder, continuing from its newest complete checkpoint
        (`resume_from_checkpoint`) with the same config; without a checkpoint it starts over. Returns the state."""
        run_dir = self.run_dir(run_id, owner)
        run = RunFolder(run_dir)
        with self._lock:
            state, _ = self._state(run_id, run_dir)
            if state not in ("failed", "stopped"):
                raise FinetuneError(f"run `{run_id[:8]}` is {state}; only a failed or stopped run can be resumed")
            config = self._config(run_dir)
            if config is None:
                raise FinetuneError(f"run `{run_id[:8]}` has no readable {CONFIG_FILE}, so it can't be resumed; "
                                    "start a new run")
            checkpoint = run.latest_complete_checkpoint()
            config = config.replace(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            run.write_config(config)
            run.stop_request_file.unlink(missing_ok=True)
            note = f"resuming from {checkpoint.name}" if checkpoint else "no complete checkpoint: starting over"
            with run.log_file.open("a", encoding="utf-8") as log:
                log.write(f"\n=== {note} ===\n")
            run.write_status({"state": "queued", "time": time.time()})
            self._queue.append(run_id)
        self.pump()
        return self.status(run_id, owner).state

    def queue_position(self, run_id: str) -> int | None:
        """1 when the run starts next, None when it is not waiting."""
        with self._lock:
            return self._queue.index(run_id) + 1 if run_id in self._queue else None

    def stop(self, run_id: str, owner: str) -> str:
        """Stop a run: a queued one is dropped from the queue; a running one gets SIGTERM (the trainer
        saves a checkpoint and the adapter, then marks itself `stopped`), and SIGKILL after
        `stop_timeout_s`. Returns the new state."""
        run_dir = self.run_dir(run_id, owner)
        run = RunFolder(run_dir)
        with self._lock:
            if run_id in self._queue:
                self._queue.remove(run_id)
                run.write_status({"state": "stopped", "time": time.time(), "error": "stopped before it started"})
                return "stopped"
            state, _ = self._state(run_id, run_dir)
            if state not in ("running", "stopping") or run_id != self._active:
                return state
            run.stop_request_file.write_text(str(time.time()), encoding="utf-8")
            self._signal(signal.SIGTERM)
            self._kill_at = time.time() + self.stop_timeout_s
            status = run.read_status()
            if status.get("state") == "running":
                status.update(state="stopping", time=time.time())
                run.write_status(status)
            return "stopping"

    def list_runs(self, owner: str) -> list[RunSummary]:
        """The runs `owner` may see (all of them when shared), newest first, read from disk (so they survive an app
        restart)."""
        summaries = []
        for run_dir in self.runs_dir.iterdir():
            if not _RUN_ID.fullmatch(run_dir.name) or not self._visible(run_dir, owner):
                continue
            with self._lock:
                state, _ = self._state(run_dir.name, run_dir)
            config = self._config(run_dir)
            results = RunFolder(run_dir).read_results() or {}
            summaries.append(RunSummary(
                run_id=run_dir.name, state=state, created=self._created(run_dir),
                base_model=config.base_model if config else "?", method=config.method if config else "?",
                dataset=Path(config.dataset).name if config and config.dataset else "?",
                train_loss=results.get("train_loss"),
                has_weights=RunFolder(run_dir).final_dir is not None))
        return sorted(summaries, key=lambda s: s.created, reverse=True)

    def run_dir(self, run_id: str, owner: str) -> Path:
        """The folder of run `run_id`; RunNotFound for a malformed id or a run that `owner` may not see."""
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise RunNotFound(f"no run `{str(run_id)[:80]}`; pick one of your runs from the list")
        run_dir = self.runs_dir / run_id
        if not run_dir.is_dir() or not owner or not self._visible(run_dir, owner):
            raise RunNotFound(f"no run `{run_id}` in this session; pick one of your runs from the list")
        return run_dir

    def active_run(self) -> str | None:
        with self._lock:
            return self._active

    def pump(self) -> None:
        """Reap a finished process, escalate an overdue stop, start the next queued run. Idempotent."""
        with self._lock:
            if self._active is not None:
                self._check_active()
            if self._active is None:
                self._start_next()

    def close(self) -> None:
        """Stop the queue thread (running trainings continue; a new manager adopts them)."""
        self._closed.set()
        if self._worker is not None:
            self._worker.join(timeout=5)

    def apply_retention(self) -> list[str]:
        """`cleanup` with this manager's retention (from the environment in the app); run at start and after
        each run ends."""
        if not self.retention.active:
            return []
        return self.cleanup(max_age_days=self.retention.max_age_days,
                            max_total_bytes=self.retention.max_total_bytes)

    def cleanup(self, *, max_age_days: float | None = None, max_total_bytes: int | None = None) -> list[str]:
        """Delete finished, stopped and failed runs older than `max_age_days`, then the oldest ones until the
        runs folder fits in `max_total_bytes`. Queued and running runs are never touched. Returns deleted ids."""
        with self._lock:
            done = []
            for run_dir in self.runs_dir.iterdir():
                if _RUN_ID.fullmatch(run_dir.name) and self._state(run_dir.name, run_dir)[0] in DONE_STATES:
                    done.append((self._created(run_dir), run_dir))
            done.sort()
            deleted = []
            if max_age_days is not None:
                cutoff = time.time() - max_age_days * 86400
                for created, run_dir in list(done):
                    if created < cutoff:
                        shutil.rmtree(run_dir, ignore_errors=True)
                        deleted.append(run_dir.name)
                        done.remove((created, run_dir))
            if max_total_bytes is not None:
                total = folder_bytes(self.runs_dir)
                for _created, run_dir in done:
                    if total <= max_total_bytes:
                        break
                    total -= RunFolder(run_dir).size_bytes()
                    shutil.rmtree(run_dir, ignore_errors=True)
                    deleted.append(run_dir.name)
            return deleted

    # ------------------------------------------------------------------ state
    def _state(self, run_id: str, run_dir: Path) -> tuple[str, dict]:
        """The run's state from its status file, corrected by what we know about its process."""
        info = RunFolder(run_dir).read_status()
        state = info.get("state")
        if state in ("running", "stopping"):
            alive = self._alive(run_id, run_dir, info)
            if not alive:
                info = self._record_death(run_dir, info)
                state = info["state"]
        elif state == "queued" and run_id not in self._queue and run_id != self._active:
            state, info = "failed", {**info, "error": "the app restarted before this run could start; start it again"}
        elif state not in ACTIVE_STATES + DONE_STATES:
            state, info = "failed", {**info, "error": info.get("error") or "the run folder has no status"}
        return state, info

    def _alive(self, run_id: str, run_dir: Path, info: dict) -> bool:
        if run_id == self._active and self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(info.get("pid"), run_dir)

    def _record_death(self, run_dir: Path, info: dict) -> dict:
        """A process that died while its status said running: stopped if we asked it to, else failed."""
        run = RunFolder(run_dir)
        code = self._proc.returncode if self._proc is not None and self._active == run_dir.name else None
        if run.stop_request_file.exists():
            info = {**info, "state": "stopped", "error": "stopped before the trainer could save; "
                    "the last checkpoint (if any) is in checkpoints/"}
        else:
            how = f" (exit code {code})" if code not in (None, 0) else ""
            if code is not None and code < 0:
                how = f" (killed by signal {-code}{', SIGKILL: often out of memory' if code == -9 else ''})"
            last = tail(run.log_file, 8)
            info = {**info, "state": "failed",
                    "error": f"the training process ended unexpectedly{how}." + (f" Last log lines:\n{last}"
                                                                                 if last else "")}
        info["time"] = time.time()
        run.write_status(info)
        return info

    def _visible(self, run_dir: Path, owner: str) -> bool:
        return self.shared or self._owner(run_dir) == owner

    def _owner(self, run_dir: Path) -> str | None:
        data = read_json_object(RunFolder(run_dir).owner_file)
        return data.get("owner") if data else None

    def _created(self, run_dir: Path) -> float:
        data = read_json_object(RunFolder(run_dir).owner_file) or {}
        return float(data.get("created") or run_dir.stat().st_mtime)

    def _config(self, run_dir: Path) -> RunConfig | None:
        try:
            return RunFolder(run_dir).read_config()
        except FinetuneError:
            return None

    def _total_steps(self, run_dir: Path, config: RunConfig | None) -> int | None:
        """From the training split file (data/train.jsonl), which the trainer writes before its first step."""
        if config is None:
            return None
        if config.max_steps > 0:
            return config.max_steps
        n_train = _count_lines(RunFolder(run_dir).split_file("train"))
        return estimate_total_steps(config, n_train) if n_train else None

    # ------------------------------------------------------------------ the queue and the process
    def _recover(self) -> None:
        """After an app restart: re-queue queued runs (oldest first) and adopt a training still alive."""
        queued = []
        for run_dir in self.runs_dir.iterdir():
            if not _RUN_ID.fullmatch(run_dir.name):
                continue
            info = RunFolder(run_dir).read_status()
            if info.get("state") == "queued":
                queued.append((self._created(run_dir), run_dir.name))
            elif info.get("state") in ("running", "stopping") and self._active is None \
                    and _pid_alive(info.get("pid"), run_dir):
                self._active = run_dir.name
        self._queue.extend(run_id for _, run_id in sorted(queued))

    def _work(self) -> None:
        while not self._closed.wait(self.poll_interval_s):
            try:
                self.pump()
            except Exception as e:  # the queue must keep going; the error lands in the run
                log.error("run queue: %s: %s", type(e).__name__, e)

    def _check_active(self) -> None:
        run_id = self._active
        run_dir = self.runs_dir / run_id
        info = RunFolder(run_dir).read_status()
        if self._alive(run_id, run_dir, info):
            if self._kill_at is not None and time.time() > self._kill_at:
                self._signal(signal.SIGKILL)
                self._kill_at = None
            return
        if info.get("state") in ("running", "stopping"):
            self._record_death(run_dir, info)
        self._active, self._proc, self._kill_at = None, None, None
        self.apply_retention()  # the run that just ended is the newest, so never the one deleted by age

    def _start_next(self) -> None:
        while self._queue:
            run_id = self._queue.popleft()
            run_dir = self.runs_dir / run_id
            hub_token = self._hub_tokens.pop(run_id, None)  # leaves memory now, whether the run starts or not
            if RunFolder(run_dir).read_status().get("state") != "queued":
                continue  # stopped while waiting
            self._launch(run_id, run_dir, hub_token)
            return

    def _launch(self, run_id: str, run_dir: Path, hub_token: str | None) -> None:
        env = environment_with_token(os.environ, hub_token)
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        run = RunFolder(run_dir)
        with run.log_file.open("ab") as log:
            # An argument list (no shell); a new session so signals to the app never reach the trainer.
            processes = int((read_json_object(run.launch_file) or {}).get("num_processes", 1))
            command = train_command(self.python, run.config_file, processes)  # a list: no shell
            self._proc = subprocess.Popen(command,
                                          cwd=str(run_dir), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self._active = run_id
        run.write_status({"state": "running", "pid": self._proc.pid, "time": time.time()})

    def _signal(self, sig: int) -> None:
        pid = self._proc.pid if self._proc is not None else \
            RunFolder(self.runs_dir / self._active).read_status().get("pid")
        if not pid:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


__all__ = ["ACTIVE_STATES", "DONE_STATES", "Retention", "RunManager", "RunNotFound", "RunStatus", "RunSummary",
           "copy_into", "estimate_total_steps", "safe_filename", "tail", "workspace_from_env"]
