"""The Space's settings: space.yaml and README.md's front matter say the same thing, and they match the app."""

from __future__ import annotations

from pathlib import Path

import gradio
import yaml

ROOT = Path(__file__).resolve().parents[1]


def front_matter(text: str) -> dict:
    assert text.startswith("---\n"), "README.md must start with the Spaces front matter (a `---` line)"
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def test_readme_front_matter_matches_space_yaml():
    space = yaml.safe_load((ROOT / "space.yaml").read_text(encoding="utf-8"))
    assert front_matter((ROOT / "README.md").read_text(encoding="utf-8")) == space


def test_space_yaml_points_at_the_app_and_asks_for_repo_write_access():
    space = yaml.safe_load((ROOT / "space.yaml").read_text(encoding="utf-8"))
    assert space["sdk"] == "gradio" and space["sdk_version"] == gradio.__version__
    assert (ROOT / space["app_file"]).is_file()
    assert space["hf_oauth"] is True and {"write-repos", "manage-repos"} <= set(space["hf_oauth_scopes"])


def test_short_description_fits_the_hubs_60_character_limit():
    space = yaml.safe_load((ROOT / "space.yaml").read_text(encoding="utf-8"))
    assert len(space["short_description"]) <= 60
