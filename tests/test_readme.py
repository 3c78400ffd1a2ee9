"""The README starts with the two fresh-machine commands, CI runs exactly the second one, and the package that
`pip install -e .` installs takes its dependencies from requirements.txt's pins."""

import importlib
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_install_and_run_then_install_and_test():
    main_job, tests = readme_commands()[:2]
    assert "pip install -r requirements.txt -e ." in main_job
    assert main_job.rstrip().endswith("&& finetune train examples/quickstart.yaml")
    assert "pip install -r requirements-dev.txt && ruff check . && python -m pytest" in tests
    assert tests.rstrip().endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    tests = readme_commands()[1]
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-export.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].split(" --config-settings=")[0].strip()  # llama.cpp's build settings
            if line and line not in ("-r requirements.txt", "-r requirements-export.txt", "-e ."):
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", line), f"{name}: {line} is not pinned"
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()
    text = (ROOT / "requirements.txt").read_text() + (ROOT / "requirements-dev.txt").read_text()
    assert "torchvision" not in text and "torchaudio" not in text


def test_the_package_depends_on_requirements_txt_and_installs_the_finetune_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    # setuptools reads that file as one requirement per line: no `-r`/`-e` options, no comments after a pin
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        assert not line.startswith("-") and (line.startswith("#") or "#" not in line), line
    assert "-e ." in (ROOT / "requirements-dev.txt").read_text().splitlines()  # tests run the installed package
    module, _, name = project["project"]["scripts"]["finetune"].partition(":")
    assert getattr(importlib.import_module(module), name) is importlib.import_module("finetune.cli").main


def test_the_layout_lists_every_module_and_no_missing_one():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    listed = set(re.findall(r"\w+\.py\b", layout))
    modules = {p.name for folder in ("finetune", "ui", "benchmarks") for p in (ROOT / folder).rglob("*.py")
               if p.name != "__init__.py"}
    helpers = {p.name for p in (ROOT / "tests").glob("*.py") if not p.name.startswith("test_")}
    assert modules | helpers | {"app.py"} <= listed
    assert listed <= modules | helpers | {"app.py"}, "the layout names a file that isn't there"
    assert "fixtures/" in layout and (ROOT / "tests" / "fixtures").is_dir()
