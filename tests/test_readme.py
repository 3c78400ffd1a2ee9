"""The README starts with the two fresh-machine commands, and CI runs exactly the second one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_install_and_run_then_install_and_test():
    main_job, tests = readme_commands()[:2]
    assert "pip install -r requirements.txt" in main_job and "python -m finetune train examples/quickstart.yaml" in main_job
    assert "pip install -r requirements-dev.txt" in tests and tests.rstrip().endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    tests = readme_commands()[1]
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", line), f"{name}: {line} is not pinned"
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()
    text = (ROOT / "requirements.txt").read_text() + (ROOT / "requirements-dev.txt").read_text()
    assert "torchvision" not in text and "torchaudio" not in text
