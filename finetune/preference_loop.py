"""The judge-and-train loop of the app's Compare tab: a judgement → a row of the run's preferences.jsonl → a DPO
stage that starts from that run.

    judgement_row         the conversation, the two answers shown, the choice (and a better answer) → one row
    already_judged        the row number of an earlier judgement of the same answers, if any
    count_judgements      pairs (what DPO learns from) and unpaired rows (both bad, no better answer written)
    preference_pairs      the {prompt, chosen, rejected} rows of the judgements that are pairs
    read_preference_pairs a preference file's pairs (any shape `finetune.data` detects as pairs), to mix in
    loop_config           the DPO RunConfig: the judged run's config, `stage: dpo`, `init_from` that run

A row of preferences.jsonl:

    {"prompt": [turns up to the user's last message], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}], "choice": "base", "edited": false,
     "answers": {"base": ..., "finetuned": ...}, "time": "2025-01-31T12:00:00+00:00"}

`prompt` + `chosen` + `rejected` is TRL's conversational preference shape, which `finetune.data` detects as pairs,
so a file of pair rows trains as it is (`stage: dpo`, `dataset: preferences.jsonl`). `choice` is base | finetuned
(that pane's answer is chosen, the other one rejected), sample_1 | sample_2 (two samples of the fine-tuned model:
the picked one is chosen, the other rejected) or both_bad. A better answer the user wrote is always the chosen one
(`edited: true`); for both_bad it is chosen over the fine-tuned answer, since the fine-tuned model is the one the
next stage trains. A both_bad row without a better answer has `chosen` and `rejected` null: it records what was
wrong, is counted apart and is left out of training (a pair needs a good answer); with `skip_invalid: true` the
file still trains, and data.py reports those rows as skipped.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import NamedTuple

from .config import RunConfig
from .errors import DataError

# choice → (the answer it prefers, the answer it rejects); None: no answer shown is good
CHOICES = {"base": ("base", "finetuned"), "finetuned": ("finetuned", "base"), "both_bad": (None, "finetuned"),
           "sample_1": ("sample_1", "sample_2"), "sample_2": ("sample_2", "sample_1")}
ANSWER_NAMES = {"base": "the base answer", "finetuned": "the fine-tuned answer", "sample_1": "sample 1",
                "sample_2": "sample 2"}

# The DPO stage the loop starts: small, so it runs in minutes on a CPU with the demo model.
LOOP_EPOCHS = 3.0
LOOP_BATCH_SIZE = 4
HELD_OUT_FROM_PAIRS = 20  # below this many pairs, every pair trains (a test split of one or two says nothing)


class JudgementCount(NamedTuple):
    pairs: int     # rows with a chosen and a rejected answer: what a DPO stage learns from
    unpaired: int  # both_bad rows without a better answer: recorded, not trained on


def judgement_row(prompt: list[dict], answers: dict[str, str], choice: str, better: str | None = None, *,
                  now: datetime.datetime | None = None) -> dict:
    """The preferences.jsonl row for one judgement. `prompt`: the conversation the answers reply to (ending with
    the user's turn); `answers`: the two answers shown ({base, finetuned} or {sample_1, sample_2}); `better`: a
    better answer the user wrote (blank: none). DataError when the judgement can't make a sensible row."""
    if choice not in CHOICES:
        raise DataError(f"unknown choice {choice!r}; use one of {', '.join(CHOICES)}")
    good, bad = CHOICES[choice]
    shown = ("sample_1", "sample_2") if choice.startswith("sample") else ("base", "finetuned")
    if sorted(answers) != sorted(shown):
        raise DataError(f"choice `{choice}` judges {' and '.join(shown)}, but the answers given are "
                        f"{', '.join(answers) or 'none'}")
    if not prompt or prompt[-1].get("role") != "user":
        raise DataError("nothing to judge yet: ask both models something first")
    better = (better or "").strip()
    chosen = better or (answers[good] if good else None)
    rejected = answers[bad] if chosen is not None else None
    if chosen is not None and not chosen.strip():
        raise DataError(f"{ANSWER_NAMES[good]} is empty; write a better answer in the box, or pick the other one")
    if chosen is not None and chosen.strip() == rejected.strip():
        raise DataError(f"the chosen answer and {ANSWER_NAMES[bad]} are the same text, so there is nothing to "
                        "prefer; write a better answer in the box")
    when = now or datetime.datetime.now(datetime.timezone.utc)
    return {"prompt": [dict(turn) for turn in prompt],
            "chosen": None if chosen is None else [{"role": "assistant", "content": chosen}],
            "rejected": None if rejected is None else [{"role": "assistant", "content": rejected}],
            "choice": choice, "edited": bool(better), "answers": dict(answers),
            "time": when.isoformat(timespec="seconds")}


def is_pair(row: dict) -> bool:
    return bool(row.get("chosen")) and bool(row.get("rejected"))


def already_judged(rows: list[dict], prompt: list[dict], answers: dict[str, str]) -> int | None:
    """The 1-based number of the row that already judged these answers to this prompt, or None."""
    return next((n for n, row in enumerate(rows, 1) if row.get("prompt") == prompt and row.get("answers") == answers),
                None)


def count_judgements(rows: list[dict]) -> JudgementCount:
    pairs = sum(1 for row in rows if is_pair(row))
    return JudgementCount(pairs=pairs, unpaired=len(rows) - pairs)


def preference_pairs(rows: list[dict]) -> list[dict]:
    """The judgements DPO learns from, as plain {prompt, chosen, rejected} rows."""
    return [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows if is_pair(row)]


def read_preference_pairs(path: str | Path, *, max_bytes: int | None = None) -> list[dict]:
    """The {prompt, chosen, rejected} rows of a preference file, in whatever pair shape `finetune.data` detects
    (the README's table), normalised to the loop's shape so both can go in one training file."""
    from .data import display_name, normalize_rows, read_rows

    source = display_name(path)
    data = normalize_rows(read_rows(path, max_bytes=max_bytes), source=source, pairs_required=True)
    if data.preference != "pairs":
        held = "answers labelled true/false (KTO rows)" if data.preference == "kto" else "plain examples"
        raise DataError(f"{source} holds {held}, not chosen/rejected pairs; mix in a file of rows such as "
                        '{"prompt": ..., "chosen": ..., "rejected": ...}', source=source)
    return [{key: row[key] for key in ("prompt", "chosen", "rejected", "tools") if key in row}
            for row in data.preference_rows]


def loop_config(judged: RunConfig, judged_dir: str | Path, dataset: str, pairs: int) -> RunConfig:
    """The DPO stage that learns `pairs` preference pairs (in `dataset`) starting from the judged run's weights:
    its config with `stage: dpo`, `init_from` that run, the stage's default learning rate and beta, and a short
    schedule (LOOP_EPOCHS over the pairs, a step per batch, every step logged for the live reward plots). Its
    `output_dir` is a folder next to the judged run's (the run manager puts it in a run folder of its own)."""
    if pairs < 1:
        raise DataError("no preference pairs yet: mark which answer is better (or write a better one) first")
    judged_dir = Path(judged_dir).resolve()
    return judged.replace(
        stage="dpo", init_from=str(judged_dir), output_dir=f"{judged_dir}-dpo", dataset=dataset, dataset_config=None,
        dataset_split="train", data_format="auto", column_mapping={}, max_rows=None, skip_invalid=False,
        learning_rate=None, beta=0.1, loss_type=None, num_train_epochs=LOOP_EPOCHS, max_steps=-1,
        batch_size=min(LOOP_BATCH_SIZE, pairs), gradient_accumulation_steps=1, eval_fraction=0.0,
        test_fraction=0.1 if pairs >= HELD_OUT_FROM_PAIRS else 0.0, warmup_ratio=0.0, logging_steps=1,
        eval_steps=None, save_steps=None, early_stopping_patience=None, resume_from_checkpoint=None)


__all__ = ["CHOICES", "JudgementCount", "already_judged", "count_judgements", "is_pair", "judgement_row",
           "loop_config", "preference_pairs", "read_preference_pairs"]
