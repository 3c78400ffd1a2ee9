"""Security: sessions can't reach each other's runs, names can't escape a run folder, a Space never pushes with its
owner's HF_TOKEN for a visitor, saved configs hold no token, `trust_remote_code` is off unless turned on (with a
warning), YAML is only safe-loaded, weights load only as safetensors or `weights_only` torch files, and no
subprocess runs through a shell."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune.cli import build_parser, config_from_args
from finetune.config import RunConfig
from finetune.errors import ConfigError
from finetune.hub import resolve_token
from finetune.models import TRUST_REMOTE_CODE_WARNING
from finetune.runs import RunManager, RunNotFound
from hub_server import HubStandIn, Token
from ui import compare_tab, export_tab, train_tab
from ui.context import OwnershipPolicy, create_context

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "data" / "python_qa.jsonl"
SOURCE_FILES = sorted([*(ROOT / "finetune").rglob("*.py"), *(ROOT / "ui").rglob("*.py"), ROOT / "app.py"])
OWNER_TOKEN = "hf_PlantedSpaceOwnerSecret0123456789XYZ"   # the Space owner's HF_TOKEN secret
VISITOR_TOKEN = "hf_PlantedVisitorToken0123456789abcdXYZ"  # what a visitor pastes
NO_TRAINING = "/bin/true"  # as the run manager's interpreter: runs are queued and started, but train nothing


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub stand-in with two users; the client points at it, with every Hub path in tmp_path."""
    from huggingface_hub import constants

    with HubStandIn({OWNER_TOKEN: Token("owner"), VISITOR_TOKEN: Token("visitor")}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for name, sub in (("HF_HOME", ""), ("HF_HUB_CACHE", "hub"), ("HF_XET_CACHE", "xet"),
                          ("HF_TOKEN_PATH", "token"), ("HF_ASSETS_CACHE", "assets")):
            monkeypatch.setattr(constants, name, str(tmp_path / "hf_home" / sub))
        yield server


def _finished_run(ctx, owner: str, make_adapter_run) -> str:
    """A finished LoRA run owned by `owner` in the app's workspace (built without training)."""
    run_id = secrets.token_urlsafe(18)
    run_dir = make_adapter_run(ctx.runs.runs_dir / run_id)
    (run_dir / "owner.json").write_text(json.dumps({"owner": owner, "created": time.time()}))
    (run_dir / "status.json").write_text(json.dumps({"state": "finished"}))
    return run_id


def _space_context(tmp_path, monkeypatch, *, on_space: bool):
    if on_space:
        monkeypatch.setenv("SPACE_ID", "owner/finetune")
    else:
        monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("HF_TOKEN", OWNER_TOKEN)
    return create_context(tmp_path / "ws", start_worker=False)


# ----------------------------------------------------------------------------- tokens in a Space

def test_a_space_never_pushes_a_visitors_request_with_the_owners_hf_token(hub, tmp_path, monkeypatch,
                                                                          make_adapter_run):
    ctx = _space_context(tmp_path, monkeypatch, on_space=True)
    try:
        run_id = _finished_run(ctx, "s:visitor", make_adapter_run)
        text = export_tab.push(ctx, "s:visitor", run_id, "stolen", "adapter", True, None, "")
        assert "no Hugging Face token: sign in with Hugging Face, or paste a token" in text
        assert hub.repos == {} and not any(OWNER_TOKEN in h for h in hub.authorization_headers)

        text = export_tab.push(ctx, "s:visitor", run_id, "mine", "adapter", True, None, VISITOR_TOKEN)
        assert "Pushed: [visitor/mine]" in text, text
        assert set(hub.repos) == {"visitor/mine"}
        assert not any(OWNER_TOKEN in h for h in hub.authorization_headers)
        assert OWNER_TOKEN not in text and VISITOR_TOKEN not in text
    finally:
        ctx.runs.close()


def test_in_a_space_hub_loads_never_carry_the_owners_token(hub, tmp_path, monkeypatch):
    """A visitor types the id of the owner's private model (and a dataset id): the app and the training process
    ask the Hub without the owner's HF_TOKEN, so the private repo is "not found". The control, outside a Space,
    shows the same kind of load does send HF_TOKEN implicitly (what the guard removes)."""
    from app_server import free_port, serve_app
    from finetune.hub import resolve_model_source
    from test_app_client import App

    hub.add_repo("owner/secret-model", {"config.json": b"{}"}, private=True)
    monkeypatch.setenv("HF_TOKEN", OWNER_TOKEN)
    resolve_model_source("owner/secret-model", cache_dir=tmp_path / "control")  # locally: implicit HF_TOKEN
    assert any(OWNER_TOKEN in h for h in hub.authorization_headers)
    hub.authorization_headers.clear()
    hub.requests.clear()

    port = free_port()
    # what a Space sets (SYSTEM + the OAuth app's settings, as with `hf_oauth: true`), plus the owner's secret
    space = {"SPACE_ID": "owner/finetune", "SYSTEM": "spaces", "OAUTH_CLIENT_ID": "client",
             "OAUTH_CLIENT_SECRET": "secret", "OAUTH_SCOPES": "openid profile", "OPENID_PROVIDER_URL": hub.url}
    env = {**os.environ, **space, "HF_TOKEN": OWNER_TOKEN, "HF_ENDPOINT": hub.url,
           "HF_HOME": str(tmp_path / "space_hf_home"), "FINETUNE_WORKSPACE": str(tmp_path / "space_ws"),
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    with serve_app(env, port, tmp_path / "app.log") as (url, _):
        app = App(url)
        status, *_ = app.call("/load_data", source="Hub dataset id", hub_id="owner/secret-data",
                              base_model="demo")
        assert "ft-error" in status
        status, *_ = app.call("/load_data", source="Example dataset", example="python_qa.jsonl", base_model="demo")
        message, runs, *_ = app.call("/start_training", base_model="owner/secret-model", max_steps=1,
                                     offline_fallback=False)
        run_id = runs["value"]
        deadline = time.time() + 120
        while time.time() < deadline:
            status, *_ = app.call("/poll", run_id=run_id)
            if "ft-ok" in status or "ft-error" in status:
                break
            time.sleep(1)
    asked = [path for _, path in hub.requests]
    assert any("secret-data" in path for path in asked) and any("secret-model" in path for path in asked), asked
    assert not any(OWNER_TOKEN in h for h in hub.authorization_headers), "a load carried the owner's token"
    assert "ft-error" in status and "owner/secret-model" in status, status  # not found, as for anyone


def test_a_signed_in_visitors_token_reaches_only_their_run(tmp_path, monkeypatch):
    """In a Space the training process gets the visitor's token (to load their private or gated repos), never the
    owner's; another visitor's run started without one gets none."""
    from finetune.hub import environment_with_token, keep_owner_token_from_visitors

    environ = {"SPACE_ID": "owner/finetune", "HF_TOKEN": OWNER_TOKEN, "PATH": "/usr/bin"}
    assert keep_owner_token_from_visitors(environ)
    assert "HF_TOKEN" not in environ and environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1"
    assert environment_with_token(environ, None) == environ
    child = environment_with_token(environ, VISITOR_TOKEN)
    assert child["HF_TOKEN"] == VISITOR_TOKEN and "HF_HUB_DISABLE_IMPLICIT_TOKEN" not in child
    assert "HF_TOKEN" not in environ, "the app's own environment is unchanged"
    # locally (no SPACE_ID), or when the owner opts in, nothing changes
    local = {"HF_TOKEN": OWNER_TOKEN}
    assert not keep_owner_token_from_visitors(local) and local == {"HF_TOKEN": OWNER_TOKEN}
    opted = {"SPACE_ID": "o/s", "HF_TOKEN": OWNER_TOKEN, "FINETUNE_SPACE_LOADS_WITH_OWNER_TOKEN": "1"}
    assert not keep_owner_token_from_visitors(opted) and opted["HF_TOKEN"] == OWNER_TOKEN

    # the run manager hands the token to that run's process only, from memory
    monkeypatch.setattr(os, "environ", {k: v for k, v in environ.items()})
    seen = tmp_path / "seen"
    seen.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(f"#!{sys.executable}\nimport os, pathlib, sys\n"
                     f"pathlib.Path({str(seen)!r}, pathlib.Path(sys.argv[-1]).parent.name).write_text("
                     "os.environ.get('HF_TOKEN', '-'))\n")
    probe.chmod(0o700)
    manager = RunManager(tmp_path / "ws", python=str(probe), start_worker=False)
    try:
        config = RunConfig(dataset=str(DATASET), max_steps=1)
        with_token = manager.submit(config, "s:visitor", hub_token=VISITOR_TOKEN)
        _wait_for_state(manager, with_token, "s:visitor")
        without = manager.submit(config, "s:other")
        _wait_for_state(manager, without, "s:other")
    finally:
        manager.close()
    assert (seen / with_token).read_text() == VISITOR_TOKEN
    assert (seen / without).read_text() == "-"
    assert not any(VISITOR_TOKEN in f.read_text(errors="replace") for f in (tmp_path / "ws").rglob("*") if f.is_file())


def _wait_for_state(manager, run_id: str, owner: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not manager.status(run_id, owner).done:
        time.sleep(0.2)


def test_locally_hf_token_is_used_before_a_typed_one(hub, tmp_path, monkeypatch, make_adapter_run):
    ctx = _space_context(tmp_path, monkeypatch, on_space=False)
    try:
        run_id = _finished_run(ctx, "s:me", make_adapter_run)
        text = export_tab.push(ctx, "s:me", run_id, "mine", "adapter", True, None, VISITOR_TOKEN)
        assert "Pushed: [owner/mine]" in text, text
    finally:
        ctx.runs.close()


def test_resolve_token_without_machine_tokens_ignores_hf_token_and_the_saved_login(tmp_path, monkeypatch):
    saved = tmp_path / "token"
    saved.write_text("hf_PlantedSavedLogin0123456789abcdefXYZ")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(saved))
    monkeypatch.setenv("HF_TOKEN", OWNER_TOKEN)
    assert resolve_token(None, None, machine_tokens=False) is None
    assert resolve_token("oauth-token", VISITOR_TOKEN, machine_tokens=False) == "oauth-token"
    assert resolve_token(None, VISITOR_TOKEN, machine_tokens=False) == VISITOR_TOKEN
    assert resolve_token(None, VISITOR_TOKEN) == OWNER_TOKEN  # locally: OAuth → HF_TOKEN → typed
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token(None, None) == "hf_PlantedSavedLogin0123456789abcdefXYZ"


def test_saved_configs_have_no_token_field():
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert [n for n in names if "token" in n.lower()] == []
    with pytest.raises(ConfigError, match="unknown field `hf_token`"):
        RunConfig.from_dict({"hf_token": "hf_x"})


# ----------------------------------------------------------------------------- sessions and names

def test_sessions_cannot_reach_each_others_runs_uploads_or_outputs(tmp_path, make_adapter_run):
    ctx = create_context(tmp_path / "ws", start_worker=False, policy=OwnershipPolicy("per_user"))  # as in a Space
    try:
        run_id = _finished_run(ctx, "s:alice", make_adapter_run)
        assert [s.run_id for s in ctx.runs.list_runs("s:alice")] == [run_id]
        assert ctx.runs.list_runs("s:bob") == [] and train_tab.run_choices(ctx, "s:bob") == []
        denied = f"no run `{run_id}` in this session"
        status, *_ = train_tab.poll(ctx, "s:bob", run_id, {})
        assert denied in status
        assert denied in train_tab.stop_run(ctx, "s:bob", run_id)
        assert denied in train_tab.resume_run(ctx, "s:bob", run_id)
        for call in (lambda: export_tab.export_zip(ctx, "s:bob", run_id),
                     lambda: export_tab.merge_run(ctx, "s:bob", run_id, "fp32")):
            with pytest.raises(RunNotFound, match=denied):
                call()
        assert denied in export_tab.push(ctx, "s:bob", run_id, "x", "adapter", True, None, VISITOR_TOKEN)
        text, folder = compare_tab.load_model(ctx, "s:bob", run_id, "")
        assert folder is None and "no run" in text
        # uploads: one folder per owner, named by a hash so that an owner string never becomes a path
        alice, bob, odd = ctx.uploads_dir("s:alice"), ctx.uploads_dir("s:bob"), ctx.uploads_dir("../../etc")
        assert len({alice, bob, odd}) == 3 and all(p.parent == ctx.workspace / "uploads" for p in (alice, bob, odd))
        # and alice herself gets her zip
        assert export_tab.export_zip(ctx, "s:alice", run_id).is_file()
    finally:
        ctx.runs.close()


def test_run_ids_are_unguessable(tmp_path):
    manager_ids = set()
    manager = RunManager(tmp_path / "ws", start_worker=False, python=NO_TRAINING)
    try:
        config = RunConfig(base_model="demo", dataset=str(DATASET))
        for _ in range(50):
            manager_ids.add(manager.submit(config, "alice"))
    finally:
        manager.close()
    assert len(manager_ids) == 50
    # 24 URL-safe characters = 144 random bits; no counter, time or owner in them
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", i) for i in manager_ids)
    assert len({i[:6] for i in manager_ids}) == 50


@pytest.mark.parametrize("name, stored", [
    ("../../x.jsonl", "x.jsonl"), ("/etc/cron.d/evil.jsonl", "evil.jsonl"), ("..\\..\\win.jsonl", "win.jsonl"),
    ("..", "upload"), ("/", "upload"), ("a/../../../b.csv", "b.csv"), ("\x00evil.json", "_evil.json"),
])
def test_uploaded_names_cannot_write_outside_the_run_folder(tmp_path, name, stored):
    manager = RunManager(tmp_path / "ws", start_worker=False, python=NO_TRAINING)
    try:
        run_id = manager.submit(RunConfig(base_model="demo"), "alice", dataset_file=DATASET, dataset_name=name)
        run_dir = manager.run_dir(run_id, "alice")
        assert [p.name for p in (run_dir / "input").iterdir()] == [stored]
        assert RunConfig.from_yaml(run_dir / "run.yaml").dataset == str((run_dir / "input" / stored).resolve())
        outside = {p for p in tmp_path.rglob("*") if p.is_file() and run_dir not in p.parents}
        assert outside == set(), f"written outside the run folder: {outside}"
    finally:
        manager.close()


# ----------------------------------------------------------------------------- trust_remote_code

def test_trust_remote_code_is_off_by_default_and_the_cli_warns_when_it_is_on(capsys):
    assert RunConfig().trust_remote_code is False
    parse = build_parser().parse_args
    config_from_args(parse(["train", "--base_model", "demo"]))
    assert "trust_remote_code" not in capsys.readouterr().err
    config = config_from_args(parse(["train", "--base_model", "demo", "--trust_remote_code", "true"]))
    assert config.trust_remote_code is True
    assert capsys.readouterr().err == f"warning: {TRUST_REMOTE_CODE_WARNING}\n"
    assert "Only use it for repos you trust" in TRUST_REMOTE_CODE_WARNING


def test_the_app_shows_a_warning_while_trust_remote_code_is_ticked(tmp_path):
    from ui import build_app

    ctx = create_context(tmp_path / "ws", start_worker=False)
    try:
        demo = build_app(ctx, hub_ok=False)
    finally:
        ctx.runs.close()
    ids = {c["props"].get("elem_id"): c["id"] for c in demo.config["components"]}
    box, warning = ids["field-trust_remote_code"], ids["settings-trust-warning"]
    assert [c["props"]["value"] for c in demo.config["components"] if c["id"] == box] == [False]
    [handler] = [fn.fn for fn in demo.fns.values()
                 if [box, "change"] in [list(t) for t in fn.targets] and [o._id for o in fn.outputs] == [warning]]
    on, off = handler(True), handler(False)  # what the page shows when the box is ticked, then unticked
    assert on["visible"] is True and "ft-warning" in on["value"] and "Only use it for repos you trust" in on["value"]
    assert off["visible"] is False and off["value"] == ""


# ----------------------------------------------------------------------------- safe loading (source scans)

def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_yaml_is_only_safe_loaded():
    bad = []
    for path in SOURCE_FILES:
        for node, name in _calls(path):
            if name.startswith("yaml.") and name not in ("yaml.safe_load", "yaml.safe_load_all", "yaml.safe_dump"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")  # load, full_load, unsafe_load, ...
            if any(k.arg == "Loader" for k in node.keywords):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} Loader=")
    assert bad == []


def test_a_config_with_a_python_object_tag_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"base_model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml: invalid YAML: could not determine a constructor for the tag "
                                          r"'tag:yaml.org,2002:python/object/apply:os.system'"):
        RunConfig.from_yaml(config)
    assert not marker.exists()


def test_torch_files_are_only_loaded_with_weights_only():
    bad = []
    for path in SOURCE_FILES:
        for node, name in _calls(path):
            weights_only = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
            unpickles = name.startswith(("pickle.", "dill.", "joblib.")) and name.split(".")[-1] in ("load", "loads")
            if (name == "torch.load" and not weights_only) or unpickles:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert bad == []


def test_nothing_saves_weights_as_pickles():
    """Adapters and models are saved with `save_pretrained` (safetensors by default) and nothing turns that off;
    train deletes the pickled training_args.bin from the final folder. (test_reliability checks a real run.)"""
    sources = "\n".join(p.read_text() for p in SOURCE_FILES)
    assert "safe_serialization=False" not in sources and "use_safetensors=False" not in sources
    assert '"training_args.bin"' in (ROOT / "finetune" / "train.py").read_text()


def test_no_shell_and_subprocess_arguments_are_lists():
    bad = []
    for path in SOURCE_FILES:
        for node, name in _calls(path):
            where = f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:80]}"
            if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                bad.append(where)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                bad.append(where)
            if name.startswith("subprocess.") and node.args and not isinstance(node.args[0], (ast.List, ast.Name)):
                bad.append(where)  # a string command (or anything built inline that isn't a list)
    assert bad == []
    assert any(name == "subprocess.Popen" for path in SOURCE_FILES for _, name in _calls(path))  # the scan sees them
