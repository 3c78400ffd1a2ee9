"""What every tab shares: the workspace, the run manager, loaded models, who the caller is (`OwnershipPolicy`)
and each owner's last form.

One `AppContext` per app process. Handlers receive it explicitly (no module globals), so tests build
one on a temporary workspace and call handlers directly.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.errors import FinetuneError
from finetune.run_folder import read_json_object, write_json_atomic
from finetune.runs import Retention, RunManager, workspace_from_env

# Session owners we mint ourselves look like this; anything else arriving from a browser is ignored,
# so nobody can claim another user's runs (e.g. an `hf:` owner) by editing localStorage.
_SESSION_OWNER = re.compile(r"s:[A-Za-z0-9_-]{22,64}")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
SHARED_RUNS_ENV = "FINETUNE_SHARED_RUNS"
LOCAL_OWNER = "local"  # the one user of an app run locally


@dataclass(frozen=True)
class OwnershipPolicy:
    """Whose a run is and who sees it, decided here and nowhere else, from the deployment:

    - `single_user`: `python app.py` outside a Space. One person; every run in the workspace is listed and
      loadable from any browser, including runs of earlier app processes.
    - `per_user`: in a Space. A signed-in Hugging Face user's runs follow them to any browser; an anonymous
      visitor's belong to their browser session (an id kept in its localStorage); an API client's to its
      Gradio session.
    - `team`: a Space with $FINETUNE_SHARED_RUNS=1 (a private team Space). Owners as in `per_user`, but
      everyone sees every run.
    $FINETUNE_SHARED_RUNS=0 keeps owners apart outside a Space too (a server that several people use).
    """
    mode: Literal["single_user", "per_user", "team"]

    @classmethod
    def from_env(cls, environ=None) -> OwnershipPolicy:
        environ = os.environ if environ is None else environ
        on_space = bool(environ.get("SPACE_ID"))
        raw = environ.get(SHARED_RUNS_ENV, "").strip().lower()
        if raw in _TRUE:
            return cls("team" if on_space else "single_user")
        if raw in _FALSE:
            return cls("per_user")
        if raw:
            raise FinetuneError(f"${SHARED_RUNS_ENV} must be 1 (everyone sees every run) or 0 (each user sees only "
                                f"their own runs), got {raw!r}; unset it for the default of this deployment")
        return cls("per_user" if on_space else "single_user")

    @property
    def shared(self) -> bool:
        """Whether everyone sees every run (the run manager enforces it)."""
        return self.mode != "per_user"

    @property
    def initial_owner(self) -> str:
        """The owner before the page has loaded. API clients never load the page and keep it: the local user, or
        "" (then `owner_of` gives them their Gradio session)."""
        return LOCAL_OWNER if self.mode == "single_user" else ""

    def owner(self, saved: dict | None, username: str | None) -> str:
        """The owner of a browser that loads the page: its signed-in user, its saved session, or the local user."""
        return LOCAL_OWNER if self.mode == "single_user" else session_owner(saved, username)

    def describe(self, workspace: Path, owner: str) -> str:
        """The page footer, once the page knows its owner: where runs live and whose they are."""
        where = f"Workspace: `{workspace}` · runs are kept on disk"
        if self.mode == "single_user":
            return f"{where}; every run in it is listed here, in any browser, and again after a restart."
        if self.mode == "team":
            return f"{where}; they are shared: everyone using this app sees every run."
        if owner.startswith("hf:"):
            return f"{where}. Signed in as {owner[3:]}: your runs follow you to any browser."
        return (f"{where}. Not signed in: your runs belong to this browser; sign in with Hugging Face to keep them "
                "in any browser.")


@dataclass
class AppContext:
    workspace: Path
    runs: RunManager
    secret: str                          # encrypts the session id kept in the browser's localStorage
    allow_local_paths: bool              # may users point the app at folders on this machine?
    on_space: bool                       # running inside a Hugging Face Space (OAuth, no local paths)
    max_upload_bytes: int
    policy: OwnershipPolicy                # whose a run is, and who sees it
    chat_models: "ChatModelCache" = field(default_factory=lambda: ChatModelCache())
    tokenizers: dict = field(default_factory=dict)  # (model path, template choice, revision) → (tokenizer, template)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    form_lock: threading.Lock = field(default_factory=threading.Lock)  # saved forms: read, merge, write

    def uploads_dir(self, owner: str) -> Path:
        """A per-owner folder for pasted rows; named by a hash so an owner string never becomes a path."""
        folder = self.workspace / "uploads" / _owner_hash(owner)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def saved_form(self, owner: str) -> dict[str, Any]:
        """`owner`'s last form: {"values": {widget name: value}, "loaded": whether a dataset was loaded}. Kept on
        the server, so it follows the owner as its runs do (and paths in it were written by the app, not sent)."""
        data = read_json_object(self._form_file(owner)) or {}
        values = data.get("values")
        return {"values": values if isinstance(values, dict) else {}, "loaded": data.get("loaded") is True}

    def save_form(self, owner: str, values: dict[str, Any] | None = None, *, loaded: bool | None = None) -> None:
        """Merge `values` (and the loaded flag) into `owner`'s saved form."""
        with self.form_lock:  # a page saves one changed widget at a time, but several may arrive at once
            form = self.saved_form(owner)
            form["values"].update(values or {})
            if loaded is not None:
                form["loaded"] = loaded
            path = self._form_file(owner)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, form)

    def _form_file(self, owner: str) -> Path:
        return self.workspace / "forms" / f"{_owner_hash(owner)}.json"


def _owner_hash(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:24]


def create_context(workspace: str | Path | None = None, *, start_worker: bool = True,
                   policy: OwnershipPolicy | None = None) -> AppContext:
    """The app's context on `workspace` (default: $FINETUNE_WORKSPACE); `policy` default: from the environment."""
    workspace = Path(workspace).expanduser().resolve() if workspace else workspace_from_env()
    workspace.mkdir(parents=True, exist_ok=True)
    policy = policy or OwnershipPolicy.from_env()
    on_space = bool(os.environ.get("SPACE_ID"))
    allow_local = os.environ.get("FINETUNE_ALLOW_LOCAL_PATHS", "0" if on_space else "1").lower() in _TRUE
    max_mb = float(os.environ.get("FINETUNE_MAX_UPLOAD_MB", "200"))
    # old runs are deleted by age / quota ($FINETUNE_MAX_RUN_AGE_DAYS, $FINETUNE_MAX_WORKSPACE_GB) at start
    # and after each run; never a queued or running one
    runs = RunManager(workspace, start_worker=start_worker, retention=Retention.from_env(), shared=policy.shared)
    return AppContext(workspace=workspace, runs=runs,
                      secret=_browser_secret(workspace), allow_local_paths=allow_local, on_space=on_space,
                      max_upload_bytes=int(max_mb * 1_000_000), policy=policy)


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
