"""A real browser (Debian's chromium, driven by Playwright) clicks through the whole app on the demo model:
data preview → live training → side-by-side streamed chat → adapter zip download; and stop → resume.

Screenshots go to tests/artifacts/ (gitignored). Needs `/usr/bin/chromium`:
    apt-get update && apt-get install -y chromium
"""

from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

import pytest

from app_server import running_app

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]
TRAIN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser-app")
    with running_app(folder / "workspace", folder / "app.log") as url:
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


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=re.compile(name)).click()
    page.wait_for_timeout(300)


def test_whole_flow_in_a_browser(app_url, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # 1. open the page
    page.goto(app_url)
    page.wait_for_selector("#data-load")
    shot(page, "01-opened")

    # 2. pick the bundled example and see the preview, with the loss-carrying text highlighted
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-ok")
    assert "python_qa.jsonl" in page.inner_text("#data-status")
    assert "format messages" in page.inner_text("#data-status")
    preview = page.inner_text("#data-preview")
    assert "trained on (carries loss)" in preview and "<|im_start|>assistant" in preview
    assert page.locator("#data-stats").get_by_text("train", exact=True).count() == 1
    shot(page, "02-data-preview")

    # 3. settings: the demo model (the Hub is offline) with few steps; then train and watch it live
    open_tab(page, "Model & settings")
    assert "demo" in page.input_value("#field-base_model input")
    page.fill("#field-num_train_epochs input", "2")
    page.fill("#field-max_seq_length input", "256")
    page.click("#settings-show-yaml")
    page.wait_for_selector("#settings-command")
    assert "python -m finetune train run.yaml" in page.inner_text("#settings-command")
    shot(page, "03-settings")

    open_tab(page, "Train")
    page.click("#train-start")
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
    page.wait_for_selector("#data-load")
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
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app_url)
    page.wait_for_selector("#data-load")
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-ok")
    open_tab(page, "Model & settings")
    page.fill("#field-max_seq_length input", "128")
    page.click("#settings-advanced .label-wrap")
    page.fill("#field-max_steps input", "400")
    page.fill("#field-save_steps input", "2")
    open_tab(page, "Train")
    page.click("#train-start")
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


def test_data_and_settings_views_stay_current_in_a_browser(app_url, browser):
    """The Example slider follows typing; another source drops the old preview; a JSON error leaves no empty boxes
    and keeps the column mapping shut; skip_invalid skips a malformed line; the YAML follows every change."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app_url)
    page.wait_for_selector("#data-load")
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

    page.get_by_text("Format and columns").click()
    page.check("#field-skip_invalid input")
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-ok")
    assert "1 invalid rows skipped (first: row 2: invalid JSON on line 2: Expecting value (column 32))" in \
        page.inner_text("#data-status")
    assert page.locator("#data-preview").is_visible()
    shot(page, "10-data-skipped-line")

    open_tab(page, "Model & settings")
    page.click("#settings-show-yaml")
    page.wait_for_selector("#settings-yaml")
    assert "method: lora" in page.inner_text("#settings-yaml")
    page.get_by_text("Full: update every weight").click()
    page.wait_for_function("() => document.querySelector('#settings-yaml').innerText.includes('method: full')")
    assert page.input_value("#field-learning_rate input") == "0.0002"
    page.wait_for_function("() => document.querySelector('#settings-yaml').innerText.includes('learning_rate: 0.0002')")
    page.fill("#field-num_train_epochs input", "5")
    page.wait_for_function("() => document.querySelector('#settings-yaml').innerText.includes('num_train_epochs: 5.0')")
    assert "pasted_rows.jsonl" in page.inner_text("#settings-yaml")
    assert "Estimate time" in page.inner_text("#settings-time") or "Expected duration" in page.inner_text(
        "#settings-time")
    shot(page, "11-settings-follow-changes")


def test_statuses_stay_current_and_the_log_follows_its_tail(app_url, browser):
    """While training the run list says running and the log box shows its last lines; once stopped, no "Stopping…"
    is left; after a resume the list says running, and once finished no "…it is running" is left."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app_url)
    page.wait_for_selector("#data-load")
    page.click("#data-load")
    page.wait_for_selector("#data-status .ft-ok")
    open_tab(page, "Model & settings")
    page.fill("#field-max_seq_length input", "128")
    page.click("#settings-advanced .label-wrap")
    page.fill("#field-max_steps input", "24")
    page.fill("#field-save_steps input", "2")
    page.fill("#field-logging_steps input", "1")
    open_tab(page, "Train")
    page.click("#train-start")
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
    assert "step 24/24" in page.inner_text("#train-progress") and stopped_at < 24
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
