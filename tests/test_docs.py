"""The README stays a page a newcomer reads, and nothing in the repository points outside it.
(The docs site itself is built with `mkdocs build --strict` in .ci/run.)"""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def tracked_text_files() -> list:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = []
    for name in names.splitlines():
        path = REPO / name
        if path.is_file() and path.suffix not in {".flac", ".mp3", ".ogg", ".m4a", ".wav", ".png", ".parquet"}:
            try:
                files.append((name, path.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                continue
    return files


def test_readme_is_short_and_undated():
    assert len(README.splitlines()) <= 300
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README), "dates belong in git, not in the README"
    assert not re.search(r"\b(commit|before) \(?[0-9a-f]{7,40}\b", README), "no commit hashes"


def test_nothing_points_outside_the_repository():
    shared = ("../" + "shared/", "/work/" + "shared")  # spelled in two parts so this file does not match
    outside = [name for name, text in tracked_text_files() if any(s in text for s in shared)]
    assert outside == []


def test_readme_links_resolve():
    for target in re.findall(r"\]\(((?:docs|notebooks)/[^)#]+)", README):
        assert (REPO / target).exists(), target


def test_offline_and_eval_advice_work_from_a_checkout():
    assert "huggingface-cli" not in README and "hf download ibm-granite/granite-4.0-1b-speech" in README
    assert "granite-batch[eval]" not in README and "pip install -e '.[eval]'" in README
