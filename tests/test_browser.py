"""A real browser (Debian's chromium, driven by Playwright) clicks through the whole app on the demo model:
data preview → live training → side-by-side streamed chat → adapter zip download; and stop → resume. Then what a
returning user needs: runs seen from another browser, the form kept over a reload, one page width on every tab,
and runs compared side by side; and the preference loop: judge answers in Compare → a DPO run on them → judge that
run.

Screenshots go to tests/artifacts/ (gitignored). Needs `/usr/bin/chromium`:
    apt-get update && apt-get install -y chromium
"""

from __future__ import annotations

import json
import re
import secrets
import time
import zipfile
from pathlib import Path

import pytest

from app_server import running_app
from run_folders import loss_metrics, write_finished_run
from ui.forms import advanced_fields

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]
TRAIN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, workspace) of the one app server the tests in this file share (run locally: one user)."""
    folder = tmp_path_factory.mktemp("browser-app")
    with running_app(folder / "workspace", folder / "app.log") as url:
        yield url, folder / "workspace"


@pytest.fixture(scope="module")
def app_url(app):
    return app[0]


@pytest.fixture
def own_app_url(tmp_path):
    """An app server of the test's own: locally the form is one user's and is restored on load, so a test that
    checks the form itself starts from the defaults, not from what earlier tests left."""
    with running_app(tmp_path / "workspace", tmp_path / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium. Install it with "
                    "`apt-get update && apt-get install -y chromium` (CI does this in .ci/run).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield b
        b.close()


def open_app(page, url: str) -> None:
    """Open the app and wait for the page load to finish: it restores the form, and would undo earlier typing."""
    page.goto(url)
    wait_until_loaded(page)


def wait_until_loaded(page) -> None:
    page.wait_for_selector("#data-load")
    page.wait_for_function("() => document.querySelector('#footer').innerText.includes('Workspace')")


def use_example_source(page) -> None:
    """Locally the form is one user's and is restored on load: a test that needs the example source picks it (an
    earlier test may have left "Paste rows" selected), which loads the example at once."""
    if not page.locator("#data-example").is_visible():
        page.get_by_text("Example dataset", exact=True).click()
        page.wait_for_selector("#data-example", state="visible")
        page.wait_for_selector("#data-status .ft-ok")


def loaded_page(browser, url: str, *, downloads: bool = False, errors: list[str] | None = None, **fields):
    """A new page with the app open and the bundled example loaded (the Data tab's Load pressed); with `fields`
    (RunConfig names), the Model & settings tab is open with them typed in. `errors` collects the page's script
    errors."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=downloads)
    page.set_default_timeout(60_000)
    if errors is not None:
        page.on("pageerror", lambda e: errors.append(str(e)))
    open_app(page, url)
    use_example_source(page)
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-ok")
    if fields:
        fill_settings(page, **fields)
    return page


def fill_settings(page, **fields) -> None:
    """Open Model & settings and type `fields` into their boxes: the basic ones, then the Advanced ones (the
    accordion opened once)."""
    open_tab(page, "Model & settings")
    advanced = [name for name in fields if name in advanced_fields()]
    for name in [name for name in fields if name not in advanced]:
        page.fill(f"#field-{name} input", str(fields[name]))
    if advanced:
        page.click("#settings-advanced .label-wrap")
    for name in advanced:
        page.fill(f"#field-{name} input", str(fields[name]))


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=re.compile(name)).click()
    page.wait_for_timeout(300)


def test_whole_flow_in_a_browser(app_url, browser):
    # 1-2. open the page, load the bundled example and see the preview, with the loss-carrying text highlighted
    errors: list[str] = []
    page = loaded_page(browser, app_url, downloads=True, errors=errors)
    assert "python_qa.jsonl" in page.inner_text("#data-status")
    assert "format messages" in page.inner_text("#data-status")
    preview = page.inner_text("#data-preview")
    assert "trained on (carries loss)" in preview and "<|im_start|>assistant" in preview
    assert page.locator("#data-stats").get_by_text("train", exact=True).count() == 1
    shot(page, "02-data-preview")

    # 3. settings: the demo model (the Hub is offline), 32 steps with a loss point each (enough to watch it live);
    # then train and watch it live
    fill_settings(page, num_train_epochs=8, max_seq_length=256, logging_steps=1)
    assert "demo" in page.input_value("#field-base_model input")
    page.click("#settings-show-yaml")
    page.wait_for_selector("#settings-command")
    assert "python -m finetune train run.yaml" in page.inner_text("#settings-command")
    shot(page, "03-settings")

    open_tab(page, "Train")
    start_run(page)
    seen_steps: set[int] = set()
    seen_curves: set[str] = set()  # the train loss line's SVG path, as it grows
    train_line = page.locator('#train-loss-plot path[aria-roledescription="line mark"]').first
    deadline = time.time() + TRAIN_TIMEOUT_S
    while time.time() < deadline:
        if page.locator("#train-status .ft-ok, #train-status .ft-error").count():
            break
        text = page.inner_text("#train-progress") if page.locator("#train-progress-text").count() else ""
        match = re.search(r"step (\d+)/(\d+)", text)
        curve = train_line.get_attribute("d") if train_line.count() else None
        if match and int(match.group(1)) > 0:
            seen_steps.add(int(match.group(1)))
            if curve:
                if not seen_curves:
                    shot(page, "04-training-live")
                seen_curves.add(curve)
        page.wait_for_timeout(500)
    status = page.inner_text("#train-status")
    assert "finished" in status, f"training did not finish: {status}\n{page.inner_text('#train-log')}"
    assert len(seen_steps) >= 2, f"the progress bar did not move while training: steps seen {seen_steps}"
    assert len(seen_curves) >= 2, f"the loss plot did not update while training ({len(seen_curves)} curves)"
    page.wait_for_selector("#train-metrics")
    assert "test perplexity before → after" in page.inner_text("#train-metrics")
    shot(page, "05-training-finished")
    run_name = re.search(r"Run (\S{8}) finished", status).group(1)

    # reloading the page reattaches to the session and its last run
    page.reload()
    wait_until_loaded(page)
    open_tab(page, "Train")
    page.wait_for_selector("#train-status .ft-ok")
    assert f"Run {run_name} finished" in page.inner_text("#train-status")
    assert "100%" in page.inner_text("#train-progress")

    # 4. compare: one message, two different streamed answers
    open_tab(page, "Compare")
    page.click("#compare-load")
    page.wait_for_selector("#compare-status .ft-ok", timeout=90_000)
    page.fill("#chat-message textarea", "How do I reverse a list in Python?")
    page.click("#chat-send")
    page.wait_for_function(
        "() => document.querySelectorAll('#chat-tuned .message-row, #chat-tuned [data-testid=\"bot\"]').length > 0",
        timeout=90_000)
    _wait_until_idle(page)
    base_answer = _last_bot_text(page, "#chat-base")
    tuned_answer = _last_bot_text(page, "#chat-tuned")
    assert base_answer and tuned_answer, (base_answer, tuned_answer)
    assert base_answer != tuned_answer
    shot(page, "06-compare")

    # the test prompts: prompt, reference and both answers readable side by side, inside the page
    page.get_by_text("Test prompts: base vs fine-tuned").click()
    page.click("#compare-run-tests")
    page.wait_for_selector("#compare-answers-table", timeout=120_000)
    table = page.locator("#compare-answers-table")
    table.scroll_into_view_if_needed()
    headers = table.locator("th")
    assert [headers.nth(i).inner_text().strip() for i in range(headers.count())] == \
        ["prompt", "reference", "base answer", "fine-tuned answer"]
    viewport = page.viewport_size["width"]
    for i in range(4):
        box = headers.nth(i).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport and box["width"] > 150, (i, box, viewport)
    first_row = table.locator("tbody tr").first.locator("td")
    for i in (2, 3):  # both answers, each with its scores under it, on screen
        cell = first_row.nth(i)
        assert cell.is_visible() and "token F1" in cell.inner_text(), cell.inner_text()
        box = cell.bounding_box()
        assert box["x"] + box["width"] <= viewport
    shot(page, "06b-compare-test-prompts")

    # 5. export: download the adapter zip
    open_tab(page, "Export")
    page.click("#export-zip")
    page.wait_for_selector("#export-download", state="visible")
    with page.expect_download() as download_info:
        page.click("#export-download")
    target = ARTIFACTS / "adapter.zip"
    download_info.value.save_as(str(target))
    names = zipfile.ZipFile(target).namelist()
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names and "run.yaml" in names
    shot(page, "07-export")
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_stop_then_resume_in_a_browser(app_url, browser):
    """Stop a run after a checkpoint, resume it from that checkpoint with the Resume button: it goes on past the
    step it stopped at (and is stopped again, to keep the test short)."""
    page = loaded_page(browser, app_url, max_seq_length=128, max_steps=400, save_steps=2)
    open_tab(page, "Train")
    start_run(page)
    stopped_at = _stop_after(page, lambda step: step >= 4)
    assert stopped_at >= 4

    page.click("#train-resume")
    page.wait_for_selector("#train-message .ft-ok")
    message = page.inner_text("#train-message")
    match = re.search(r"resumes from checkpoint-(\d+)", message)
    assert match, message
    assert int(match.group(1)) >= 4, message  # the stop itself saves one, at the step it stopped (after step 4)
    stopped_again = _stop_after(page, lambda step: step > stopped_at + 2)
    assert stopped_again > stopped_at + 2
    assert f"step {stopped_again}/400" in page.inner_text("#train-progress"), "a stopped run's bar: done / planned"
    shot(page, "08-resumed-and-stopped")


def start_run(page) -> str:
    """Press Start and wait until the live view follows the new run (it showed the newest earlier run before:
    locally, every run in the workspace is listed); return the run's short name."""
    page.click("#train-start")
    page.wait_for_selector("#train-message .ft-ok")
    name = re.search(r"Run (\S{8}) queued", page.inner_text("#train-message")).group(1)
    page.wait_for_function(f"() => document.querySelector('#train-status').innerText.includes('Run {name}')")
    return name


def test_judge_answers_then_train_on_them_in_a_browser(app, app_url, browser):
    """The Compare tab's loop: judge three answers (base better; both bad with a better answer written; one of two
    fine-tuned samples), see three rows in the run's preferences.jsonl and the counter at 3, train a DPO stage on
    them, watch it finish and find it selected in the Compare run list, ready to be judged in turn."""
    errors: list[str] = []
    page = loaded_page(browser, app_url, errors=errors, max_seq_length=128, max_steps=2)
    open_tab(page, "Train")
    sft_name = start_run(page)
    page.wait_for_selector("#train-status .ft-ok, #train-status .ft-error", timeout=TRAIN_TIMEOUT_S * 1000)
    assert "finished" in page.inner_text("#train-status"), page.inner_text("#train-log")

    open_tab(page, "Compare")
    page.click("#compare-load")
    page.wait_for_selector("#compare-status .ft-ok", timeout=90_000)
    page.wait_for_function("() => document.querySelector('#pref-counter').innerText.includes('0 preference pairs')")

    def ask(question: str) -> None:
        before = page.locator("#chat-tuned [data-testid='bot']").count()
        page.fill("#chat-message textarea", question)
        page.click("#chat-send")
        page.wait_for_function(f"() => document.querySelectorAll('#chat-tuned [data-testid=\"bot\"]').length > "
                               f"{before}", timeout=90_000)
        _wait_until_idle(page)

    def saved(row: int) -> str:
        page.wait_for_function(f"() => document.querySelector('#pref-status').innerText.includes('row {row} of')")
        return page.inner_text("#pref-status")

    ask("How do I reverse a list in Python?")
    page.click("#pref-base")
    assert "the base answer preferred to the fine-tuned answer" in saved(1)
    ask("What does len() return?")
    page.fill("#pref-better textarea", "The number of items in the container.")
    page.click("#pref-both-bad")
    assert "your answer preferred to the fine-tuned answer" in saved(2)
    assert page.input_value("#pref-better textarea") == ""  # a saved judgement clears the box
    ask("How do I open a file?")
    page.click("#pref-samples")
    page.wait_for_function("() => document.querySelector('#pref-status').innerText.includes('pick the better one')",
                           timeout=90_000)
    samples = [page.input_value(f"#pref-sample-{i} textarea") for i in (1, 2)]
    assert all(samples) and samples[0] != samples[1], samples
    page.click("#pref-pick-2")
    assert "sample 2 preferred to sample 1" in saved(3)
    page.wait_for_function("() => document.querySelector('#pref-counter').innerText.includes('3 preference pairs')")
    assert page.inner_text("#pref-train").strip() == "Train on my 3 preferences"
    shot(page, "09-compare-judged")

    judged = next(p for p in (app[1] / "runs").glob("*/preferences.jsonl")
                  if p.parent.name.startswith(sft_name))
    rows = [json.loads(line) for line in judged.read_text().splitlines()]
    assert [r["choice"] for r in rows] == ["base", "both_bad", "sample_2"]
    assert rows[1]["chosen"][0]["content"] == "The number of items in the container."
    assert [r["chosen"][0]["content"] for r in rows[2:]] == [samples[1]]

    page.click("#pref-train")
    page.wait_for_selector("#pref-run-status .ft-notice")
    assert "your 3 pairs, starting from run" in page.inner_text("#pref-run-status")
    page.wait_for_selector("#pref-run-status .ft-ok, #pref-run-status .ft-error, #pref-run-status .ft-warning",
                           timeout=TRAIN_TIMEOUT_S * 1000)
    status = page.inner_text("#pref-run-status")
    assert "finished" in status, status
    dpo_id = re.search(r"DPO run (\S{8}) finished", status).group(1)
    listed = page.input_value("#compare-run input")
    assert dpo_id[:6] in listed and "preferences.jsonl" in listed and "finished" in listed, listed
    shot(page, "10-compare-dpo-finished")

    page.click("#compare-load")  # the DPO run: judged like any other, its own (empty) preferences
    page.wait_for_function("() => document.querySelector('#compare-status').innerText.includes('"
                           + dpo_id + "')", timeout=90_000)
    page.wait_for_function("() => document.querySelector('#pref-counter').innerText.includes('0 preference pairs')")
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_data_and_settings_views_stay_current_in_a_browser(own_app_url, browser):
    """The Example slider follows typing; another source drops the old preview; a JSON error leaves no empty boxes
    and keeps the column mapping shut, and "Skip invalid rows" skips the broken line; the YAML follows every
    change."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    open_app(page, own_app_url)
    use_example_source(page)
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-ok")
    first = page.inner_text("#data-preview")
    number = page.locator("#data-preview-index input[type=number]")
    number.fill("3")
    number.press("Enter")
    page.wait_for_function("(first) => document.querySelector('#data-preview').innerText !== first", arg=first)

    page.get_by_text("Paste rows", exact=True).click()
    page.wait_for_selector("#data-preview", state="hidden")
    assert "Paste rows, then press Load and preview." in page.inner_text("#data-status")
    assert not page.locator("#data-stats").is_visible() and not page.locator("#data-histogram").is_visible()
    good = [f'{{"instruction": "Say {w}", "output": "{w.title()}"}}' for w in
            ("hi", "bye", "yes", "no", "maybe", "never", "always", "soon", "later", "now")]
    page.fill("#data-paste textarea", "\n".join([good[0], '{"instruction": "x", "output": }', *good[1:]]))
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-error")
    assert "invalid JSON on line 2: Expecting value (column 32)" in page.inner_text("#data-status")
    assert not page.locator("#data-preview").is_visible() and not page.locator("#data-stats").is_visible()
    assert not page.locator("#field-column_mapping").is_visible()  # "(column 32)" is no dataset column
    shot(page, "09-data-json-error")

    page.get_by_text("Format and columns").click()  # "Skip invalid rows": the same text loads, the bad line skipped
    page.locator("#field-skip_invalid input").check()
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-ok")
    assert "1 invalid rows skipped (first: row 2: invalid JSON on line 2: Expecting value (column 32))" in (
        page.inner_text("#data-status"))
    assert page.locator("#data-preview").is_visible()

    open_tab(page, "Model & settings")
    page.click("#settings-show-yaml")
    page.wait_for_selector("#settings-yaml")
    assert "method: lora" in page.inner_text("#settings-yaml")
    page.get_by_text("Full: update every weight").click()
    page.wait_for_function("() => document.querySelector('#settings-yaml').innerText.includes('method: full')")
    page.wait_for_function("() => document.querySelector('#field-learning_rate input').value === '0.001'")
    page.wait_for_function("() => document.querySelector('#settings-yaml').innerText.includes('learning_rate: 0.001')")
    page.fill("#field-num_train_epochs input", "5")
    page.wait_for_function("() => document.querySelector('#settings-yaml').innerText.includes('num_train_epochs: 5.0')")
    assert "pasted_rows.jsonl" in page.inner_text("#settings-yaml")
    assert "Estimate time" in page.inner_text("#settings-time") or "Expected duration" in page.inner_text(
        "#settings-time")
    shot(page, "11-settings-follow-changes")


def test_statuses_stay_current_and_the_log_follows_its_tail(app_url, browser):
    """While training the run list says running and the log box shows its last lines; once stopped, no "Stopping…"
    is left; after a resume the list says running, and once finished no "…it is running" is left."""
    # 120 steps: long enough to stop on a fast machine
    page = loaded_page(browser, app_url, max_seq_length=128, max_steps=120, save_steps=2, logging_steps=1)
    open_tab(page, "Train")
    start_run(page)
    page.wait_for_function("() => document.querySelector('#train-run input').value.includes('· running')")
    # enough log lines to overflow the box: it shows the newest ones
    page.wait_for_function("() => { const t = document.querySelector('#train-log textarea');"
                           " return t && t.scrollHeight > t.clientHeight + 40; }", timeout=TRAIN_TIMEOUT_S * 1000)
    page.wait_for_timeout(1500)
    assert _log_at_bottom(page), _log_scroll(page)
    shot(page, "12-log-follows-its-tail")

    stopped_at = _stop_after(page, lambda step: step >= 4)
    page.wait_for_function("() => !document.querySelector('#train-message').innerText.includes('Stopping')")
    page.wait_for_function("() => document.querySelector('#train-run input').value.includes('· stopped')")
    shot(page, "13-stopped-status-current")

    page.click("#train-resume")
    page.wait_for_selector("#train-message .ft-ok")
    assert "it is running" in page.inner_text("#train-message") or "queued" in page.inner_text("#train-message")
    page.wait_for_function("() => /· (running|queued)/.test(document.querySelector('#train-run input').value)")
    page.wait_for_selector("#train-status .ft-ok", timeout=TRAIN_TIMEOUT_S * 1000)
    assert "finished" in page.inner_text("#train-status")
    page.wait_for_function("() => !document.querySelector('#train-message').innerText.includes('is running')")
    page.wait_for_function("() => document.querySelector('#train-run input').value.includes('· finished')")
    assert re.search(r"finished, last loss \d+\.\d{3}", page.input_value("#train-run input"))
    assert "step 120/120" in page.inner_text("#train-progress") and stopped_at < 120
    page.wait_for_timeout(1000)
    assert _log_at_bottom(page), _log_scroll(page)
    shot(page, "14-finished-status-current")


def _log_scroll(page) -> dict:
    return page.evaluate("() => { const t = document.querySelector('#train-log textarea');"
                         " return {top: t.scrollTop, height: t.clientHeight, total: t.scrollHeight}; }")


def _log_at_bottom(page) -> bool:
    s = _log_scroll(page)
    return s["total"] > s["height"] and s["top"] + s["height"] >= s["total"] - 4


def _stop_after(page, condition) -> int:
    """Watch the progress bar until `condition(step)`, click Stop, wait for "was stopped"; return the last step."""
    deadline, step = time.time() + TRAIN_TIMEOUT_S, 0
    while time.time() < deadline:
        match = re.search(r"step (\d+)/", page.inner_text("#train-progress")) \
            if page.locator("#train-progress-text").count() else None
        step = int(match.group(1)) if match else step
        if condition(step):
            break
        page.wait_for_timeout(200)
    page.click("#train-stop")
    page.wait_for_function("() => document.querySelector('#train-status').innerText.includes('was stopped')",
                           timeout=90_000)
    match = re.search(r"step (\d+)/", page.inner_text("#train-progress"))
    return int(match.group(1)) if match else step


def _last_bot_text(page, chat: str) -> str:
    bots = page.locator(f"{chat} [data-testid='bot']")
    return bots.nth(bots.count() - 1).inner_text().strip() if bots.count() else ""


def _wait_until_idle(page, timeout_s: float = 90) -> None:
    """Until the tuned pane's answer stops changing for 2 s (streaming has ended)."""
    deadline, last, stable_since = time.time() + timeout_s, None, time.time()
    while time.time() < deadline:
        now = _last_bot_text(page, "#chat-tuned")
        if now != last:
            last, stable_since = now, time.time()
        elif now and time.time() - stable_since > 2:
            return
        page.wait_for_timeout(300)


# ----------------------------------------------------------------------------- issue 17: runs, form, width, compare

TABS = ("Data", "Model & settings", "Train", "Compare", "Export", "Runs")


def fresh_page(browser, url: str):
    """A page in a new browser context: nothing shared with other pages but the server (no localStorage)."""
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.set_default_timeout(60_000)
    open_app(page, url)
    return page


def dropdown_options(page, elem_id: str) -> list[str]:
    page.click(f"#{elem_id} input")
    page.wait_for_selector("ul.option-list li")
    labels = page.locator("ul.option-list li").evaluate_all("items => items.map(li => li.getAttribute('aria-label'))")
    page.keyboard.press("Escape")
    return labels


def pick(page, elem_id: str, text: str) -> None:
    """Choose the option of dropdown `elem_id` whose label contains `text`."""
    page.click(f"#{elem_id} input")
    page.locator("ul.option-list li", has_text=text).first.click()


def test_a_local_run_is_seen_and_opened_from_any_browser(app, browser, make_adapter_run):
    """Locally, every run on disk is the one user's: a browser with no stored session lists a run that another
    browser session started under an earlier app process, shows it, and loads it by its folder's path."""
    url, workspace = app
    run_id = secrets.token_urlsafe(18)
    run_dir = make_adapter_run(workspace / "runs" / run_id)
    write_finished_run(workspace / "runs", "s:" + "o" * 32, run_id=run_id)
    for context in ("first", "second"):
        page = fresh_page(browser, url)
        open_tab(page, "Train")
        assert any(run_id[:6] in label for label in dropdown_options(page, "train-run")), context
        open_tab(page, "Compare")
        page.fill("#compare-path textarea", str(run_dir))
        page.click("#compare-load")
        page.wait_for_selector("#compare-status .ft-ok, #compare-status .ft-error", timeout=90_000)
        assert f"Loaded run {run_id[:8]}" in page.inner_text("#compare-status"), context
        page.context.close()


def test_a_reload_keeps_the_whole_form(own_app_url, browser):
    page = fresh_page(browser, own_app_url)
    use_example_source(page)
    pick(page, "data-example", "zenx_headlines.json")  # picking an example loads it
    page.wait_for_function("() => document.querySelector('#data-status').innerText.includes('zenx_headlines.json')")
    open_tab(page, "Model & settings")
    page.fill("#field-num_train_epochs input", "5")
    page.click("#settings-advanced .label-wrap")
    page.fill("#field-seed input", "7")
    page.press("#field-seed input", "Tab")
    page.wait_for_timeout(1000)  # the last change reaches the server

    page.reload()
    wait_until_loaded(page)
    page.wait_for_selector("#data-status .ft-ok")
    assert "zenx_headlines.json" in page.inner_text("#data-status"), "the dataset was not loaded again"
    assert page.input_value("#data-example input") == "zenx_headlines.json"
    open_tab(page, "Model & settings")
    assert page.input_value("#field-num_train_epochs input") == "5"
    page.click("#settings-advanced .label-wrap")
    assert page.input_value("#field-seed input") == "7"
    page.click("#settings-show-yaml")  # the YAML Start would run: the restored dataset and settings
    page.wait_for_selector("#settings-yaml")
    yaml_text = page.inner_text("#settings-yaml")
    assert "dataset: examples/data/zenx_headlines.json" in yaml_text and "num_train_epochs: 5.0" in yaml_text
    # (the code box renders only its visible lines, and `seed` is further down: the field above shows it)
    shot(page, "10-form-after-reload")
    page.context.close()


def test_every_tab_has_one_page_width(app, browser, make_adapter_run):
    url, workspace = app
    run_id = secrets.token_urlsafe(18)
    make_adapter_run(workspace / "runs" / run_id)
    write_finished_run(workspace / "runs", "local", run_id=run_id)
    page = fresh_page(browser, url)
    widths = {}
    for number, name in enumerate(TABS, 1):
        open_tab(page, name)
        widths[name] = page.evaluate("() => document.querySelector('#tabs').getBoundingClientRect().width")
        shot(page, f"tab-{number}-{name.split()[0].lower()}")
    assert len(set(widths.values())) == 1, widths
    open_tab(page, "Compare")  # a run's name fits its box
    pick(page, "compare-run", run_id[:6])
    assert run_id[:6] in page.input_value("#compare-run input")
    assert page.evaluate("() => { const e = document.querySelector('#compare-run input'); "
                         "return e.scrollWidth <= e.clientWidth; }"), page.input_value("#compare-run input")
    page.context.close()


def test_compare_runs_overlays_curves_and_highlights_differences(app, browser):
    url, workspace = app
    first = write_finished_run(workspace / "runs", "local", learning_rate=1e-3)
    second = write_finished_run(workspace / "runs", "local", learning_rate=3e-3, metrics=loss_metrics(2.5))
    page = fresh_page(browser, url)
    open_tab(page, "Runs")  # opening the tab lists the runs
    pick(page, "runs-pick", first[:6])
    pick(page, "runs-pick", second[:6])
    page.keyboard.press("Escape")
    page.wait_for_function("() => document.querySelector('#runs-message').innerText.includes('2 runs')")
    assert "2 runs; they differ in: learning_rate, train loss, validation loss (highlighted)" in \
        page.inner_text("#runs-message")
    page.wait_for_selector("#runs-loss-plot img")  # the figure: both runs' curves (tests/test_app_handlers.py)

    def row(name: str):
        cells = page.locator("#runs-table [role=row]", has_text=name).first.locator("[role=gridcell]")
        return cells.all_inner_texts(), cells.first.evaluate("td => getComputedStyle(td).backgroundColor")

    assert row("learning_rate") == (["learning_rate", "0.001", "0.003"], "rgb(254, 243, 199)")  # highlighted
    values, colour = row("base_model")
    assert values == ["base_model", "demo", "demo"] and colour != "rgb(254, 243, 199)"
    assert page.locator("#runs-table [role=columnheader]").all_inner_texts()[1:3] == [first[:8], second[:8]]
    shot(page, "11-compare-runs")
    page.context.close()


# ----------------------------------------------------------------------------- issue 17, round 2: a fresh walk-through

def test_the_log_shows_its_tail_when_the_train_tab_is_opened(app, browser):
    """A returning user: the page loads their last (finished) run while the Data tab is showing; opening the Train
    tab shows the log's last lines, not its first."""
    from finetune.run_folder import RunFolder

    url, workspace = app
    run_id = write_finished_run(workspace / "runs", "local", created=time.time() + 3600)  # the newest: shown on load
    RunFolder(workspace / "runs" / run_id).log_file.write_text(
        "".join(f"step {step} | loss {3 - step / 40:.4f}\n" for step in range(1, 61)) + "done: the last line\n",
        encoding="utf-8")
    page = fresh_page(browser, url)
    page.wait_for_timeout(1500)  # the poll of the restored run has filled the (not yet shown) log box
    open_tab(page, "Train")
    page.wait_for_function(f"() => document.querySelector('#train-status').innerText.includes('{run_id[:8]}')")
    page.wait_for_timeout(1000)
    assert "done: the last line" in page.input_value("#train-log textarea")
    assert _log_at_bottom(page), _log_scroll(page)
    shot(page, "15-log-tail-after-load")
    page.context.close()


def test_compared_runs_fit_the_page_and_no_empty_plot_waits_for_them(app, browser):
    """The Runs tab shows no empty plot box before runs are picked; once two are picked, every run's column of the
    settings and results table is on screen, long values (the demo model's note) wrapped."""
    from finetune.run_folder import RunFolder

    url, workspace = app
    picked = [write_finished_run(workspace / "runs", "local", learning_rate=rate) for rate in (1e-3, 3e-3)]
    for run_id in picked:  # what a finished run on the demo model has in its results
        run = RunFolder(workspace / "runs" / run_id)
        run.write_results({**run.read_results(), "is_demo_model": True, "estimated_duration_s": 60.0,
                           "actual_duration_s": 75.0})
    page = fresh_page(browser, url)
    open_tab(page, "Runs")
    assert not page.locator("#runs-loss-plot").is_visible()
    for run_id in picked:
        pick(page, "runs-pick", run_id[:6])
    page.keyboard.press("Escape")
    page.wait_for_function("() => document.querySelector('#runs-message').innerText.includes('2 runs')")
    page.wait_for_selector("#runs-loss-plot img")
    table = page.locator("#runs-table")
    table.scroll_into_view_if_needed()
    sizes = page.evaluate("() => { const t = document.querySelector('#runs-table table');"
                          " return {table: t.scrollWidth, box: t.parentElement.clientWidth}; }")
    assert sizes["table"] <= sizes["box"], sizes
    headers = page.locator("#runs-table [role=columnheader]")
    last = headers.nth(headers.count() - 1)
    assert last.inner_text().strip() == picked[1][:8]
    box, viewport = last.bounding_box(), page.viewport_size["width"]
    assert box["x"] + box["width"] <= viewport, (box, viewport)
    note = page.locator("#runs-table [role=row]", has_text="base model").first.locator("[role=gridcell]").last
    assert "tiny offline demo model" in note.inner_text()
    shot(page, "16-runs-table-fits")
    page.context.close()
