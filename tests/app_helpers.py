"""Widget values the app handler tests share: the Settings they start from, and loading the Data tab."""

from __future__ import annotations

from ui import data_tab

SETTINGS = {"base_model": "demo", "method": "lora", "max_seq_length": 256}


def load(ctx, **values):
    """Press the Data tab's Load with the bundled example dataset, or with `values` changed; what it returns."""
    base = {"source": "Example dataset", "example": "python_qa.jsonl", "data_format": "auto", "column_mapping": "",
            "skip_invalid": False, "max_rows": None}
    return data_tab.load_data(ctx, "s:owner", {**base, **values}, dict(SETTINGS))
