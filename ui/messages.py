"""Inline messages for gr.Markdown: errors, warnings, notices and successes, one look across the app.

The box's colour (style.css) says what kind of message it is; no emoji, which many fonts lack.
Messages quote user input (file names, column names), so `<`, `>` and `&` are escaped: they show as
typed and never become HTML. Backticks stay: field names render as code.
"""

from __future__ import annotations

import html


def _box(kind: str, text: str) -> str:
    body = html.escape(text, quote=False).replace("\n", "  \n")
    return f'<div class="ft-msg ft-{kind}">\n\n{body}\n\n</div>'


def error_md(text: str) -> str:
    return _box("error", text)


def warning_md(text: str) -> str:
    return _box("warning", text)


def notice_md(text: str) -> str:
    return _box("notice", text)


def ok_md(text: str) -> str:
    return _box("ok", text)
