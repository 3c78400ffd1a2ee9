"""What every tab shares: the workspace, the run manager, loaded models, and who the caller is.

One `AppContext` per app process. Handlers receive it explicitly (no module globals), so tests build
one on a temporary workspace and call handlers directly.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.runs import Retention, RunManager, workspace_from_env

# Session owners we mint ourselves look like this; anything else arriving from a browser is ignored,
# so nobody can claim another user's runs (e.g. an `hf:` owner) by editing localStorage.
_SESSION_OWNER = re.compile(r"s:[A-Za-z0-9_-]{22,64}")
_TRUE = ("1", "true", "yes", "on")


@dataclass
class AppContext:
    workspace: Path
    runs: RunManager
    secret: str                          # encrypts the session id kept in the browser's localStorage
    allow_local_paths: bool              # may users point the app at folders on this machine?
    on_space: bool                       # running inside a Hugging Face Space (OAuth, no local paths)
    max_upload_bytes: int
    chat_models: "ChatModelCache" = field(default_factory=lambda: ChatModelCache())
    tokenizers: dict = field(default_factory=dict)  # (model path, template choice, revision) → (tokenizer, template)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def uploads_dir(self, owner: str) -> Path:
        """A per-owner folder for pasted rows; named by a hash so an owner string never becomes a path."""
        import hashlib

        folder = self.workspace / "uploads" / hashlib.sha256(owner.encode()).hexdigest()[:24]
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def create_context(workspace: str | Path | None = None, *, start_worker: bool = True) -> AppContext:
    workspace = Path(workspace).expanduser().resolve() if workspace else workspace_from_env()
    workspace.mkdir(parents=True, exist_ok=True)
    on_space = bool(os.environ.get("SPACE_ID"))
    allow_local = os.environ.get("FINETUNE_ALLOW_LOCAL_PATHS", "0" if on_space else "1").lower() in _TRUE
    max_mb = float(os.environ.get("FINETUNE_MAX_UPLOAD_MB", "200"))
    # old runs are deleted by age / quota ($FINETUNE_MAX_RUN_AGE_DAYS, $FINETUNE_MAX_WORKSPACE_GB) at start
    # and after each run; never a queued or running one
    runs = RunManager(workspace, start_worker=start_worker, retention=Retention.from_env())
    return AppContext(workspace=workspace, runs=runs,
                      secret=_browser_secret(workspace), allow_local_paths=allow_local, on_space=on_space,
                      max_upload_bytes=int(max_mb * 1_000_000))


def _browser_secret(workspace: Path) -> str:
    """A secret kept in the workspace, so sessions saved in browsers survive an app restart."""
    path = workspace / ".browser_secret"
    try:
        text = path.read_text(encoding="utf-8").strip()
        if len(text) >= 32:
            return text
    except OSError:
        pass
    text = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def new_session_owner() -> str:
    return "s:" + secrets.token_urlsafe(24)


def session_owner(saved: dict | None, profile_username: str | None) -> str:
    """The owner id of this browser: the signed-in Hub user, else the id saved in the browser, else a new one."""
    if profile_username:
        return f"hf:{profile_username}"
    owner = (saved or {}).get("owner") if isinstance(saved, dict) else None
    return owner if isinstance(owner, str) and _SESSION_OWNER.fullmatch(owner) else new_session_owner()


def owner_of(owner: str | None, session_hash: str | None) -> str:
    """The caller's owner id. Browsers get one on page load; API clients (gradio_client), which never run
    the load event, own their runs through their session hash."""
    if owner:
        return owner
    if not session_hash:
        raise FinetuneError("no session: reload the page")
    return f"api:{session_hash}"


class ChatModelCache:
    """Loaded `ChatModel`s by folder, at most `size` of them (each holds one copy of its base weights)."""

    def __init__(self, size: int = 1):
        self.size = size
        self._models: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: str | Path):
        from finetune.inference import ChatModel

        key = str(Path(folder).resolve())
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            while len(self._models) >= self.size:
                self._models.popitem(last=False)
            model = ChatModel.from_run(key)
            self._models[key] = model
            return model

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)
