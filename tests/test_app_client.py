"""`python app.py` on localhost, driven through its API with gradio_client: the whole flow on the demo model
(data → training with live progress → streamed side-by-side chat → test prompts → zip → merge), plus the
isolation between two clients and inline errors for bad input."""

from __future__ import annotations

import time
import zipfile

import pytest

from app_server import running_app

TRAIN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client-app")
    # owners kept apart as in a Space (locally, every run is the one user's): the isolation check below needs it
    with running_app(folder / "workspace", folder / "app.log", FINETUNE_SHARED_RUNS="0") as url:
        yield url


class App:
    """A gradio_client session (one browser tab, as far as the app can tell) with keyword calls."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.api = self.client.view_api(return_format="dict", print_info=False)["named_endpoints"]

    def call(self, endpoint: str, **values):
        return self.client.predict(api_name=endpoint, **self._fill(endpoint, values))

    def submit(self, endpoint: str, **values):
        return self.client.submit(api_name=endpoint, **self._fill(endpoint, values))

    def _fill(self, endpoint: str, values: dict) -> dict:
        """Parameters whose widget starts empty (no default) are sent as None unless given."""
        for p in self.api[endpoint]["parameters"]:
            if not p.get("parameter_has_default") and p["parameter_name"] not in values:
                values[p["parameter_name"]] = None
        return values


TINY = dict(base_model="demo", num_train_epochs=2, learning_rate=2e-3, batch_size=4, gradient_accumulation_steps=1,
            max_seq_length=256, logging_steps=1)


def test_full_flow_through_the_api(app_url):
    app = App(app_url)
    assert {"/load_data", "/start_training", "/poll", "/stop", "/load_model", "/chat", "/test_prompts",
            "/export_zip", "/merge", "/export_merged_zip", "/push", "/show_yaml"} <= set(app.api)

    status, preview, *_ = app.call("/load_data", source="Example dataset", example="python_qa.jsonl",
                                   base_model="demo")
    assert "32 train / 4 validation / 4 test" in status
    preview = preview["value"] if isinstance(preview, dict) and "value" in preview else preview  # an update: shown
    assert any(seg["class_or_confidence"] for seg in preview)

    message, runs, *_ = app.call("/start_training", **TINY)
    run_id = runs["value"]
    assert f"Run `{run_id[:8]}` queued." in message

    steps_seen, points_seen = set(), set()
    deadline = time.time() + TRAIN_TIMEOUT_S
    while time.time() < deadline:
        status, progress, loss, lr, log, table, *_ = app.call("/poll", run_id=run_id)
        loss = loss.get("value") if isinstance(loss, dict) and "__type__" in loss else loss  # a shown/hidden update
        if isinstance(loss, dict) and "data" in loss:
            points_seen.add(len([row for row in loss["data"] if row[1] is not None]))
        if "step " in progress:
            steps_seen.add(progress.split("step ")[1].split("/")[0])
        if "ft-ok" in status or "ft-error" in status:
            break
        time.sleep(1)
    assert "finished" in status, f"{status}\n{log}"
    assert len(steps_seen) >= 2 and len(points_seen) >= 2, "the live view did not update while training"
    metrics = dict(table["value"]["data"])
    assert " → " in metrics["test perplexity before → after"]
    assert float(metrics["train loss"]) > 0

    loaded, *_ = app.call("/load_model", run_id=run_id, path="")
    assert "adapter switched off / on (one copy of the base weights)" in loaded

    job = app.submit("/chat", message="How do I reverse a list in Python?", max_new_tokens=24, temperature=0.7,
                     seed=0, system_prompt="")
    updates = list(job)
    base_chat, tuned_chat, *_ = job.result()
    assert len(updates) >= 4, "the answers did not stream"
    base_answer = base_chat[-1]["content"][0]["text"]
    tuned_answer = tuned_chat[-1]["content"][0]["text"]
    assert base_answer and tuned_answer and base_answer != tuned_answer
    assert base_chat[0]["content"][0]["text"] == "How do I reverse a list in Python?"

    summary, answers = app.call("/test_prompts", limit=2, tokens=8)
    assert "2 test prompts" in summary and len(answers["data"]) == 2

    message, download = app.call("/export_zip", run_id=run_id)
    names = zipfile.ZipFile(download["value"]).namelist()
    assert {"adapter_config.json", "adapter_model.safetensors", "run.yaml", "results.json"} <= set(names)

    merged = app.call("/merge", run_id=run_id, dtype="fp32")
    assert "Merged into a standalone fp32 model" in merged
    _, merged_download = app.call("/export_merged_zip", run_id=run_id)
    assert "model.safetensors" in zipfile.ZipFile(merged_download["value"]).namelist()

    # Another client (another browser session) sees none of it.
    other = App(app_url)
    status, *_ = other.call("/poll", run_id=run_id)
    assert "no run" in status and "in this session" in status
    assert "in this session" in other.call("/export_zip", run_id=run_id)[0]
    assert "in this session" in other.call("/load_model", run_id=run_id, path="")[0]
    assert other.call("/list_runs", run_id=None)[0]["choices"] == []


def test_bad_input_comes_back_as_a_message_not_an_error(app_url):
    app = App(app_url)
    status, preview, *_ = app.call("/load_data", source="Paste rows",
                                   paste='[{"instruction": "hi", "output": "ho"}, {"instruction": "x", "output": 3}]',
                                   base_model="demo")
    assert "pasted_rows.jsonl, row 2: field `output` must be text" in status
    assert preview == {"__type__": "update", "value": None, "visible": False}  # no preview box left empty
    message, *_ = app.call("/start_training", **TINY)
    assert "load one on the **Data** tab first" in message
    assert "pick one of your runs" in app.call("/load_model", run_id=None, path="")[0]
    assert "pick a run first" in app.call("/push", run_id=None, repo="x", what="adapter", private=True, typed="")
