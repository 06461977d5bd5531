"""`granite-batch gc`: what dead runs left is listed and removed; a live run's staging never is."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from granite_batch.cli import main
from granite_batch.run.gc import find_leftovers
from granite_batch.run.lease import take_lease
from granite_batch.schema import STAGING_DIR, TRANSCRIPTS_DIR
from granite_batch.storage import OutputRoot

DAY_S = 86400


def stage(root: Path, run_id: str, age_s: float, files: int = 3) -> Path:
    """A run's staging folder as a run leaves it: plan buckets and a staged Parquet file, `age_s` old."""
    folder = root / STAGING_DIR / run_id
    for n in range(files):
        path = folder / "plan" / f"bucket-{n:05d}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return folder


@pytest.fixture
def output(tmp_path):
    root = tmp_path / "out"
    (root / TRANSCRIPTS_DIR).mkdir(parents=True)
    dead = stage(root, "dead-run", age_s=2 * DAY_S)
    fresh = stage(root, "fresh-run", age_s=60)
    live_folder = stage(root, "live-run", age_s=3 * DAY_S)  # old files, but its run holds the lease
    lease = take_lease(OutputRoot(str(root)), TRANSCRIPTS_DIR, "live-run")
    yield {"root": root, "dead": dead, "fresh": fresh, "live": live_folder}
    lease.release()


def test_dry_run_lists_and_removes_nothing(output, capsys):
    assert main(["gc", str(output["root"]), "--older-than", "1h", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would remove" in printed and "dead-run" in printed
    assert "1 folders of dead runs" in printed
    assert all(output[name].exists() for name in ("dead", "fresh", "live"))


def test_gc_removes_only_dead_runs_past_the_age(output, capsys):
    assert main(["gc", str(output["root"]), "--older-than", "1h"]) == 0
    assert not output["dead"].exists()
    assert output["fresh"].exists()  # changed a minute ago: maybe a run without a lease, still going
    assert output["live"].exists()  # its run holds the lease, however old its files
    assert "removed 1 folders of dead runs (0.0 MB)" in capsys.readouterr().out


def test_reasons_and_sizes(output):
    found = {item.run_id: item for item in find_leftovers(OutputRoot(str(output["root"])), older_than_s=30)}
    assert found["live-run"].removable is False and "lease" in found["live-run"].why
    assert found["dead-run"].removable and found["dead-run"].files == 3 and found["dead-run"].bytes == 3000
    assert found["fresh-run"].removable  # 60 s idle is over 30 s
    assert found["dead-run"].idle_s == pytest.approx(2 * DAY_S, abs=600)


def test_a_released_lease_leaves_its_run_dead(tmp_path):
    root = tmp_path / "out"
    stage(root, "ended-run", age_s=DAY_S)
    lease = take_lease(OutputRoot(str(root)), TRANSCRIPTS_DIR, "ended-run")
    assert [item.removable for item in find_leftovers(OutputRoot(str(root)), older_than_s=3600)] == [False]
    lease.release()
    assert [item.removable for item in find_leftovers(OutputRoot(str(root)), older_than_s=3600)] == [True]


def test_the_staging_folder_goes_when_empty(tmp_path, capsys):
    root = tmp_path / "out"
    stage(root, "dead-run", age_s=DAY_S)
    assert main(["gc", str(root), "--older-than", "2h"]) == 0
    assert not (root / STAGING_DIR).exists()


def test_a_bad_age_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["gc", str(tmp_path), "--older-than", "soon"])
    assert exit_.value.code == 2
