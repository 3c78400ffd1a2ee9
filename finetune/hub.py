"""The Hugging Face Hub: tokens, loading a model by id, and pushing a run with its model card.

Tokens are handled with care: resolved in a fixed order (`resolve_token`), checked with `whoami`
before use (`check_token`), passed to the client explicitly (`token=`), and never logged, printed,
written to disk or put in an error message. `huggingface_hub.login` is never called: it saves the
token to disk. Every client error is turned into a `HubError` with a message for people
(`hub_error`), raised `from None` so no response object (whose request carries the Authorization
header) rides along in the traceback.

The endpoint is read from `HF_ENDPOINT` at call time (the client reads it once, at import), so a
mirror or a local stand-in set after import is still honoured.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import DEMO_MODEL_ID
from .errors import HubError, ModelError
from .run_folder import RunFolder, folder_bytes

log = logging.getLogger(__name__)

PushWhat = Literal["adapter", "merged", "both"]
Progress = Callable[[float, str], None]  # (fraction done 0..1, what is happening)

TOKENS_URL = "https://huggingface.co/settings/tokens"
TOKEN_REJECTED = ("your Hugging Face token was rejected (invalid or expired); create a new one with write access "
                  f"at {TOKENS_URL}")
TOKEN_READ_ONLY = ("your Hugging Face token is read-only, so it can't create repos or upload; create a token with "
                   f"the `write` role at {TOKENS_URL}")
NO_TOKEN = ("no Hugging Face token: sign in with Hugging Face, set the HF_TOKEN environment variable, or paste a "
            f"token with write access (create one at {TOKENS_URL})")
MERGED_SUFFIX = "-merged"  # what="both": the merged model goes to `{name}-merged` beside the adapter repo

# Hub repo names: letters, digits, `-`, `_`, `.`; no `--` or `..`; not starting/ending with `-` or `.`; ≤ 96 chars.
REPO_NAME = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?")
# A model id as typed by a user: `name` or `org/name`. Anything else that isn't on disk is a mistyped path.
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")  # a Hub repo id (ASCII)
# Files no transformers model needs: other frameworks' weights and original checkpoints (often many GB).
DOWNLOAD_IGNORE = ["*.onnx", "onnx/*", "*.gguf", "*.h5", "*.msgpack", "*.ot", "*.tflite", "flax_model*",
                   "tf_model*", "coreml/*", "*.mlmodel", "original/*", "openvino/*"]
# Anything shaped like a Hub token, scrubbed from any text we pass on from the client or the server.
TOKEN_SHAPE = re.compile(r"(hf_|api_org_)[A-Za-z0-9_-]{8,}|(Bearer\s+)\S+")
# Files of a run's adapter/ or model/ folder that are not pushed: our own README replaces any saved one.
SKIPPED_FILES = {"README.md", "training_args.bin"}


# ----------------------------------------------------------------------------- endpoint, offline
def hub_endpoint() -> str:
    """The Hub URL: `HF_ENDPOINT` as set now, else the client's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` (as set now, or when the client was imported): use the local cache only."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    return constants.is_offline_mode()


def _api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token, library_name="finetune")


# ----------------------------------------------------------------------------- tokens
def resolve_token(oauth_token: Any = None, typed_token: str | None = None, *,
                  machine_tokens: bool = True) -> str | None:
    """The token to use, first found: the Space's "Sign in with HF" token (a string or an object with
    `.token`, e.g. `gr.OAuthToken`), then `HF_TOKEN`, then one typed by the user, then the token saved
    by `hf auth login` (read only; never written). None when there is none.

    `machine_tokens=False` skips the machine's own tokens (`HF_TOKEN` and the saved login): a public
    Space must never push a visitor's request with its owner's token.
    """
    from huggingface_hub import constants

    oauth = getattr(oauth_token, "token", oauth_token)
    env = os.environ.get("HF_TOKEN") if machine_tokens else None
    for candidate in (oauth, env, typed_token):
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()
    if not machine_tokens:
        return None
    try:
        saved = Path(constants.HF_TOKEN_PATH).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return saved or None


OWNER_TOKEN_FOR_LOADS_ENV = "FINETUNE_SPACE_LOADS_WITH_OWNER_TOKEN"


def keep_owner_token_from_visitors(environ=None) -> bool:
    """In a Space, stop every Hub *load* (models, datasets) from using the owner's token implicitly.

    huggingface_hub sends `HF_TOKEN` (or the saved login) with every request that names no token, so a visitor
    could otherwise load the owner's private or gated repos by typing their ids. In a Space (`SPACE_ID` set) this
    removes `HF_TOKEN` from `environ` (the app's environment, which training processes inherit) and turns off
    implicit tokens (`HF_HUB_DISABLE_IMPLICIT_TOKEN`), in this process and its children. Visitors still load
    public repos, and their own private or gated ones when signed in (the run gets their token).
    An owner who wants visitors to load with the owner's token sets `FINETUNE_SPACE_LOADS_WITH_OWNER_TOKEN=1`.
    Returns whether the guard is on.
    """
    from huggingface_hub import constants

    environ = os.environ if environ is None else environ
    if not environ.get("SPACE_ID") or environ.get(OWNER_TOKEN_FOR_LOADS_ENV, "").strip().lower() in ("1", "true"):
        return False
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        environ.pop(name, None)
    environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    if environ is os.environ:
        constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True  # read per request: applies to this process from now on
    return True


def environment_with_token(environ, token: str | None) -> dict[str, str]:
    """A copy of `environ` for a child process that loads from the Hub with `token` (a visitor's), if any."""
    env = dict(environ)
    if token:
        env["HF_TOKEN"] = token
        env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)  # the child may send this (and only this) token
    return env


def check_token(token: str | None, *, write: bool = True, namespace: str | None = None) -> str:
    """The username the token belongs to, after asking the Hub (`whoami`).

    With `write`, a read-only token (or a fine-grained one without write access to `namespace`,
    default: the user's own) is refused with a message saying how to get the right one.
    """
    if not token:
        raise HubError(NO_TOKEN)
    with hub_errors("token", None, token=token):
        info = _api().whoami(token=token)
    user = info.get("name")
    if not user:
        raise HubError("the Hugging Face Hub did not say who this token belongs to; try again later")
    access = ((info.get("auth") or {}).get("accessToken")) or {}
    role = access.get("role")
    if write and role == "read":
        raise HubError(TOKEN_READ_ONLY)
    if write and role == "fineGrained" and not _fine_grained_can_write(access, namespace or user):
        raise HubError(f"your fine-grained Hugging Face token has no write access to `{namespace or user}`; edit "
                       f"it at {TOKENS_URL} to allow \"Write access to contents/settings of all repos\" under "
                       f"`{namespace or user}`, or create a token with the `write` role")
    return user


def _fine_grained_can_write(access: dict, namespace: str) -> bool:
    scoped = ((access.get("fineGrained") or {}).get("scoped")) or []
    return any("repo.write" in (s.get("permissions") or []) and (s.get("entity") or {}).get("name") == namespace
               for s in scoped)


# ----------------------------------------------------------------------------- errors
def scrub(text: str, token: str | None = None) -> str:
    """`text` with the token (and anything shaped like a token or an Authorization value) masked."""
    if token:
        text = text.replace(token, "***")
    return TOKEN_SHAPE.sub(lambda m: (m.group(2) or "") + "***", text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_failure(exc: BaseException) -> BaseException | None:
    """The first error in the chain that carries an HTTP response (snapshot_download wraps some HTTP
    errors in LocalEntryNotFoundError)."""
    for e in _chain(exc):
        if isinstance(getattr(getattr(e, "response", None), "status_code", None), int):
            return e
    return None


def _is_connection_error(exc: BaseException) -> bool:
    """No route to the Hub: a connect/read failure from httpx2 (the client's transport), `requests`
    (older code and `datasets` paths) or the OS."""
    import httpx2

    if _is_offline_error(exc):
        return False
    from_requests = type(exc).__module__.startswith("requests") and any(
        word in type(exc).__name__ for word in ("Connection", "Timeout", "Proxy", "SSL"))
    return from_requests or isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def _is_offline_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(exc, OfflineModeIsEnabled)


def hub_error_message(exc: BaseException, what: str, repo_id: str | None, *, revision: str | None = None,
                      token: str | None = None) -> str:
    """A message for people about a failed Hub call on `what` (`model`, `dataset`, `repo`...) `repo_id`.

    Distinct messages for: repo not found, gated repo, revision not found, file not found, rejected
    token, no permission, invalid id, offline mode, no network, rate limit, Hub outage, and model-card
    metadata the Hub refused. Works for exceptions from `huggingface_hub`, `httpx2` and `requests`.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{what} `{repo_id}`" if repo_id else what
    http = _http_failure(exc)
    status = http.response.status_code if http is not None else None
    if isinstance(exc, GatedRepoError):
        return (f"{name} is gated: open https://huggingface.co/{repo_id} while signed in, accept its license/"
                "conditions, wait for access to be granted, then use a token from that account "
                f"(create one at {TOKENS_URL})")
    if status == 401 and not isinstance(http, RepositoryNotFoundError):
        return TOKEN_REJECTED
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{name} was not found on the Hugging Face Hub; check the spelling (`org/name`, case matters), and if "
                "it is private, sign in or use a token from an account that can see it")
    if isinstance(exc, RevisionNotFoundError):
        rev = f"revision `{revision}`" if revision else "that revision"
        return f"{name} has no {rev}; check the branch, tag or commit hash (default: `main`)"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{name} is missing a file it needs; check that it is a complete model repo"
    if isinstance(exc, HFValidationError):
        return f"`{repo_id}` is not a valid Hugging Face Hub id: {scrub(str(exc), token)}"
    if any(_is_offline_error(e) for e in _chain(exc)) or (isinstance(exc, LocalEntryNotFoundError)
                                                          and http is None and hub_offline()):
        if what not in _LOADS:  # a token check or a push: no cache or demo model can stand in
            return (f"the Hugging Face Hub can't be reached: offline mode is on (HF_HUB_OFFLINE), so "
                    f"{_checked(what, name)} can't be checked; unset HF_HUB_OFFLINE and connect, then try again")
        return (f"offline mode is on (HF_HUB_OFFLINE) and {name} is not in the local cache; unset HF_HUB_OFFLINE "
                "to download it, point to a local folder, or use `base_model: demo` for the offline demo model")
    if status == 403:
        return (f"your Hugging Face token is not allowed to do this on {name}; use a token with write access to "
                f"that namespace ({TOKENS_URL})")
    if status == 429:
        return "the Hugging Face Hub is rate-limiting requests; wait a few minutes and try again"
    if status is not None and status >= 500:
        return (f"the Hugging Face Hub had an error ({status}) on {name}; try again later "
                "(https://status.huggingface.co)")
    if any(_is_connection_error(e) for e in _chain(exc)) or (isinstance(exc, LocalEntryNotFoundError)
                                                             and http is None):
        if what not in _LOADS:
            return (f"can't reach the Hugging Face Hub ({hub_endpoint()}), so {_checked(what, name)} can't be "
                    "checked; check your connection or proxy, then try again")
        return (f"can't reach the Hugging Face Hub ({hub_endpoint()}) for {name}, and it is not in the local cache; "
                "check your connection or proxy, set HF_HUB_OFFLINE=1 to use only cached files, or use "
                "`base_model: demo` for the offline demo model")
    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        detail = scrub(str(exc).split("\n", 1)[-1].strip(), token)
        return f"the Hub rejected the model card metadata for {name}: {detail}"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"Hugging Face Hub request for {name} failed ({type(exc).__name__}: {scrub(detail, token)})"


# What a failed download may be of: only these have a local cache (or the demo model) to fall back on.
_LOADS = ("model", "tokenizer", "dataset")


def _checked(what: str, name: str) -> str:
    return "your token" if what == "token" else name


def hub_error(exc: BaseException, what: str, repo_id: str | None, *, revision: str | None = None,
              token: str | None = None) -> HubError:
    """`hub_error_message` as a `HubError`; raise it `from None`."""
    return HubError(hub_error_message(exc, what, repo_id, revision=revision, token=token))


def _is_hub_failure(exc: BaseException) -> bool:
    """An error the Hub, the network or the user's input caused (vs. a bug in our code)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    if isinstance(exc, (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, httpx2.HTTPError)):
        return True
    if isinstance(exc, ValueError):  # the client's ValueError for card metadata the Hub refused
        return "Invalid metadata in README.md" in str(exc)
    return _is_connection_error(exc) or _is_offline_error(exc) or type(exc).__module__.startswith("requests")


@contextmanager
def hub_errors(what: str, repo_id: str | None, *, revision: str | None = None, token: str | None = None):
    """Turn a Hub/network failure raised inside into a `HubError` (raised without its cause); bugs pass through."""
    try:
        yield
    except Exception as e:
        if not _is_hub_failure(e):
            raise
        raise hub_error(e, what, repo_id, revision=revision, token=token) from None


# ----------------------------------------------------------------------------- loading from the Hub
def _progress_tqdm(progress: Progress | None, label: str):
    """A tqdm class for `snapshot_download` that forwards its files-done count to `progress`."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    if progress is None:
        return None

    class ProgressTqdm(hf_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._files_done = 0
            self._reports = kwargs.get("unit", "it") != "B"  # the files bar, not the bytes bars

        def update(self, n=1):
            if self._reports and self.total:
                self._files_done += n or 0
                progress(min(1.0, self._files_done / self.total), f"{label}: {self._files_done}/{self.total} files")
            return super().update(n)

    return ProgressTqdm


def resolve_model_source(model_id_or_path: str | Path, *, revision: str | None = None, token: str | None = None,
                         progress: Progress | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local folder for a model: a folder is returned as is, `demo` is the offline demo model, a Hub id
    is downloaded with `snapshot_download` into the Hub cache (only the cache when HF_HUB_OFFLINE is set).
    """
    name = str(model_id_or_path).strip()
    if name == DEMO_MODEL_ID:
        from .demo import demo_model_path

        return demo_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; a model is a folder saved with `save_pretrained` (or a Hub id)")
    if not MODEL_ID.fullmatch(name):
        raise ModelError(f"model folder not found: {name}; check the path, or give a Hub id such as "
                         "`HuggingFaceTB/SmolLM2-135M-Instruct`")
    from huggingface_hub import snapshot_download

    label = f"Downloading {name}"
    if progress:
        progress(0.0, label)
    with hub_errors("model", name, revision=revision, token=token):
        folder = snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir,
                                   endpoint=hub_endpoint(), local_files_only=hub_offline(),
                                   ignore_patterns=DOWNLOAD_IGNORE, tqdm_class=_progress_tqdm(progress, label))
    if progress:
        progress(1.0, f"{name} ready")
    return Path(folder)


# ----------------------------------------------------------------------------- pushing a run
@dataclass(frozen=True)
class PushedRepo:
    kind: Literal["adapter", "merged"]
    repo_id: str
    url: str
    commit_url: str
    private: bool
    files: tuple[str, ...]  # paths inside the repo, as committed


@dataclass(frozen=True)
class PushResult:
    repos: tuple[PushedRepo, ...] = field(default_factory=tuple)

    @property
    def urls(self) -> dict[str, str]:
        """kind → repo URL."""
        return {r.kind: r.url for r in self.repos}

    def __str__(self) -> str:
        return "\n".join(f"{r.kind}: {r.url}" for r in self.repos)


class _Reporter:
    """One progress line on the terminal (tqdm, hidden when not a TTY) plus the optional UI callback."""

    def __init__(self, callback: Progress | None):
        from tqdm.auto import tqdm

        self.callback = callback
        self.bar = tqdm(total=100, desc="Pushing to the Hub", unit="%", disable=None,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        fraction = max(0.0, min(1.0, fraction))
        log.info("%s", message)
        self.bar.n = round(100 * fraction)
        self.bar.set_postfix_str(message)
        if self.callback:
            self.callback(fraction, message)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Part:
    kind: Literal["adapter", "merged"]
    repo_id: str
    folder: Path
    nbytes: int = 0
    gguf: dict[str, Path] = field(default_factory=dict)  # repo path → file: the GGUF export pushed with this part


def push_run(run_dir: str | Path, repo_name: str, *, what: PushWhat = "adapter", token: str | None = None,
             private: bool = True, commit_message: str | None = None, merged_dir: str | Path | None = None,
             license: str | None = None, include_gguf: bool = False,
             progress: Progress | None = None) -> PushResult:
    """Push a run's adapter, merged model, or both, each with a model card, and return the repo URLs.

    `repo_name` is `name` (under the token's user) or `org/name`. With `what="both"` the adapter goes
    to `repo_name` and the merged model to `repo_name-merged`. `merged_dir` is a merged-model folder
    (from `finetune.merge.merge_adapter`); a full fine-tuning run pushes its `model/` as the merged
    kind. A repo is created when missing (`private` applies then; an existing repo keeps its
    visibility). `token` defaults to `resolve_token()`; it must have write access.
    `include_gguf` adds the run's GGUF export (the .gguf and its Modelfile, from `finetune.export`) to the
    merged model's repo when one is pushed, else to the adapter's: it is a standalone model.
    """
    from .model_card import read_run

    run_dir = Path(run_dir)
    config, _ = read_run(run_dir)
    folders = _folders_to_push(run_dir, config.method, what, merged_dir)
    gguf = _gguf_files(run_dir) if include_gguf else {}
    token = token or resolve_token()
    report = _Reporter(progress)
    try:
        report(0.0, "Checking the Hugging Face token")
        namespace, name = _split_repo_name(repo_name)
        user = check_token(token, write=True, namespace=namespace)
        namespace = namespace or user
        parts = [_Part(kind, f"{namespace}/{name}{MERGED_SUFFIX if kind == 'merged' and what == 'both' else ''}",
                       folder, folder_bytes(folder)) for kind, folder in folders]
        parts[-1].gguf = gguf  # the merged part when there is one (folders list the adapter first)
        parts[-1].nbytes += sum(f.stat().st_size for f in gguf.values())
        total = sum(p.nbytes for p in parts) or 1
        done, pushed = 0, []
        for part in parts:
            def part_progress(f: float, message: str, start=done, size=part.nbytes) -> None:
                report(0.05 + 0.95 * (start + f * size) / total, message)

            pushed.append(_push_part(run_dir, part, token=token, private=private, commit_message=commit_message,
                                     license=license, progress=part_progress))
            done += part.nbytes
        report(1.0, "Pushed: " + ", ".join(r.url for r in pushed))
        return PushResult(tuple(pushed))
    finally:
        report.close()


def _split_repo_name(repo_name: str) -> tuple[str | None, str]:
    text = repo_name.strip().strip("/")
    for prefix in ("https://huggingface.co/", "huggingface.co/"):
        text = text.removeprefix(prefix)
    pieces = text.split("/")
    if len(pieces) > 2 or not all(REPO_NAME.fullmatch(p) for p in pieces):
        raise HubError(f"`{repo_name}` is not a valid repo name; use `name` or `org/name` with letters, digits, "
                       "`-`, `_` and `.` (at most 96 characters, no `--` or `..`, not starting or ending with "
                       "`-` or `.`)")
    return (pieces[0], pieces[1]) if len(pieces) == 2 else (None, pieces[0])


def _folders_to_push(run_dir: Path, method: str, what: PushWhat,
                     merged_dir: str | Path | None) -> list[tuple[Literal["adapter", "merged"], Path]]:
    if what not in ("adapter", "merged", "both"):
        raise HubError(f"`what` must be adapter, merged or both (got {what!r})")
    out: list[tuple[Literal["adapter", "merged"], Path]] = []
    if what in ("adapter", "both"):
        if method == "full":
            raise ModelError(f"{run_dir} is a full fine-tuning run: it has no adapter; push it with "
                             "`what: merged` (its model/ folder is the standalone model)")
        adapter = RunFolder(run_dir).adapter_dir
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"{adapter} has no adapter_config.json; the run did not finish saving its adapter "
                             "(train it again, or resume it)")
        out.append(("adapter", adapter))
    if what in ("merged", "both"):
        merged = Path(merged_dir) if merged_dir is not None else \
            (RunFolder(run_dir).model_dir if method == "full" else None)
        if merged is None:
            raise ModelError("pushing a merged model needs the merged folder: run `python -m finetune merge "
                             f"{run_dir}` first and pass its output as `merged_dir`")
        if not (merged / "config.json").is_file() or not any(merged.glob("*.safetensors")):
            raise ModelError(f"{merged} is not a complete model folder (needs config.json and *.safetensors "
                             "weights); merge the adapter again")
        out.append(("merged", merged))
    return out


def _gguf_files(run_dir: Path) -> dict[str, Path]:
    """Repo path → file for the run's last GGUF export: the .gguf its export_report.json names, and the Modelfile."""
    from .export import REPORT_FILE

    folder = RunFolder(run_dir).gguf_dir
    report_file = folder / REPORT_FILE
    if not report_file.is_file():
        raise ModelError(f"{run_dir} has no GGUF export ({report_file} is missing); export it first with "
                         f"`python -m finetune export {run_dir}` (or the app's Export tab), then push again")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    if report.get("failed"):
        raise ModelError(f"the last GGUF export of {run_dir} failed its check ({report['failed']['message']}); "
                         "a GGUF that prompts or stops differently from the run is not pushed: fix it and export again")
    files = {name: folder / name for name in (report["gguf"], report["modelfile"])}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise ModelError(f"{', '.join(missing)} is missing from the GGUF export; export the run again")
    return files


def _push_part(run_dir: Path, part: _Part, *, token: str, private: bool, commit_message: str | None,
               license: str | None, progress: Callable[[float, str], None]) -> PushedRepo:
    from huggingface_hub import CommitOperationAdd

    api = _api(token)
    with tempfile.TemporaryDirectory(prefix="finetune-push-") as staging:
        progress(0.0, f"Writing the model card for {part.repo_id}")
        extras = _stage_extras(run_dir, part, Path(staging), license)
        files = {**_folder_files(part.folder), **part.gguf}
        for rel in extras:  # our card, config and results win over same-named files in the folder
            files.pop(rel, None)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in sorted(files.items())]
        ops += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in sorted(extras.items())]
        progress(0.02, f"Creating {part.repo_id} ({'private' if private else 'public'}) if missing")
        with hub_errors("repo", part.repo_id, token=token):
            repo_url = api.create_repo(part.repo_id, private=private, exist_ok=True, repo_type="model")
        mb = sum(Path(op.path_or_fileobj).stat().st_size for op in ops) / 1e6
        progress(0.05, f"Uploading {len(ops)} files ({mb:.1f} MB) to {part.repo_id}")
        default = "Upload LoRA adapter" if part.kind == "adapter" else "Upload merged model"
        message = commit_message or (f"{default} and GGUF" if part.gguf else default)
        with hub_errors("repo", part.repo_id, token=token):
            commit = api.create_commit(part.repo_id, ops, commit_message=message, repo_type="model")
            is_private = bool(api.model_info(part.repo_id).private)  # an existing repo keeps its visibility
    progress(1.0, f"Uploaded {part.repo_id} ({'private' if is_private else 'PUBLIC'})")
    return PushedRepo(part.kind, part.repo_id, str(repo_url), commit.commit_url, is_private,
                      tuple(op.path_in_repo for op in ops))


def _folder_files(folder: Path) -> dict[str, Path]:
    """Repo path → local file for everything in `folder` worth pushing (no hidden files or caches)."""
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and not any(p.startswith(".") for p in rel.split("/")) and rel not in SKIPPED_FILES:
            files[rel] = f
    return files


def _stage_extras(run_dir: Path, part: _Part, staging: Path, license: str | None) -> dict[str, Path]:
    """Write the card, loss curve, redacted config/results (and, for merged models, any missing
    generation config or chat template) into `staging`; return repo path → staged file."""
    import yaml

    from .model_card import (
        CONFIG_FILE,
        LOSS_CURVE_FILE,
        RESULTS_FILE,
        build_model_card,
        plot_loss_curve,
        redact_local_paths,
    )

    run = RunFolder(run_dir)
    extras: dict[str, Path] = {}
    curve = plot_loss_curve(run.read_metrics(), staging / LOSS_CURVE_FILE)
    if curve:
        extras[LOSS_CURVE_FILE] = curve
    config_data = redact_local_paths(run.read_config().to_dict())
    extras[CONFIG_FILE] = staging / CONFIG_FILE
    extras[CONFIG_FILE].write_text(
        f"# Resolved training config of this model (local paths shortened to their file names).\n"
        f"# Re-run with: python -m finetune train {CONFIG_FILE}\n"
        + yaml.safe_dump(config_data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    results = run.read_results()
    if results is not None:
        extras[RESULTS_FILE] = staging / RESULTS_FILE
        extras[RESULTS_FILE].write_text(json.dumps(redact_local_paths(results), indent=2), encoding="utf-8")
    tokenizer_dir = part.folder
    if part.kind == "merged":
        extras.update(_merged_model_extras(run_dir, part.folder, staging))
        if "chat_template.jinja" in extras:  # the template travels from the adapter: render the example there
            tokenizer_dir = run.adapter_dir
    card = build_model_card(run_dir, part.repo_id, kind=part.kind, license=license,
                            loss_curve=LOSS_CURVE_FILE if curve else None, tokenizer_dir=tokenizer_dir,
                            with_gguf=bool(part.gguf))
    extras["README.md"] = staging / "README.md"
    extras["README.md"].write_text(card, encoding="utf-8")
    return extras


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def _merged_model_extras(run_dir: Path, folder: Path, staging: Path) -> dict[str, Path]:
    """A merged folder must load and chat on its own: add generation_config.json and the chat template
    (from the run's adapter/) when the merge step didn't write them."""
    extras: dict[str, Path] = {}
    if not (folder / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder))).save_pretrained(str(staging))
        extras["generation_config.json"] = staging / "generation_config.json"
    if not _has_chat_template(folder):
        template = RunFolder(run_dir).adapter_dir / "chat_template.jinja"
        if template.is_file():
            extras["chat_template.jinja"] = Path(shutil.copy(template, staging / "chat_template.jinja"))
        else:
            log.warning("%s has no chat template; the pushed model will only take plain text", folder)
    return extras
