"""The lease on a dataset: exactly one of many racing runs wins, a killed holder's lease is taken over
after its expiry, and a run whose lease was taken away stops before its next commit.

Racers are real processes on a local directory and on the S3 server; barriers are pipes, not sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from granite_batch.lease import Lease, LeaseHeld, LeaseLost, LeaseUnsupported, read_holder

from conftest import FaultyProxy

# A racer: announce "ready", wait for "go" on stdin, try the lease once (no wait), report, and hold it
# until stdin says "release". Exit 4 when another run holds it, as the job does.
RACER = r"""
import json, sys
from granite_batch.lease import Lease, LeaseHeld
dataset, run_id, options, expiry_s = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()
try:
    lease = Lease.acquire(dataset, run_id, options, expiry_s=expiry_s, wait_s=0)
except LeaseHeld as exc:
    print(json.dumps({"held_by": exc.holder.run_id, "message": str(exc)}), flush=True)
    sys.exit(4)
print(json.dumps({"won": lease.holder.generation}), flush=True)
sys.stdin.readline()
lease.release()
"""

# A holder that "commits" numbered files: for each line on stdin it checks the lease, then writes
# commit-<n>. Exits 4 on LeaseLost without writing.
COMMITTER = r"""
import json, os, sys
from granite_batch.lease import Lease, LeaseLost
dataset, run_id, options, expiry_s, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
lease = Lease.acquire(dataset, run_id, options, expiry_s=expiry_s, wait_s=0)
print("holding", lease.holder.generation, flush=True)
for n, _ in enumerate(sys.stdin):
    try:
        lease.check()
    except LeaseLost as exc:
        print("lost:", exc, flush=True)
        sys.exit(4)
    open(os.path.join(out, f"commit-{n}"), "w").close()
    print("committed", n, flush=True)
"""


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


def _report(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return json.loads(line)


def _take_then_sigkill(uri: str, options: dict, run_id: str, expiry_s: float) -> None:
    """A process takes the lease and is killed with SIGKILL while holding it."""
    holder = _spawn(RACER, uri, run_id, json.dumps(options), str(expiry_s))
    assert holder.stdout.readline().strip() == "ready"
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert "won" in _report(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)


@pytest.fixture(params=["local", "s3"])
def dataset(request, tmp_path):
    """(dataset URI, storage options) on a local directory or in a fresh bucket on the S3 server
    (its endpoint that evaluates conditional writes atomically, as S3 does)."""
    if request.param == "local":
        return str(tmp_path / "out" / "transcripts"), {}
    endpoint = request.getfixturevalue("atomic_s3_server")
    s3 = request.getfixturevalue("s3")
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    return f"s3://{bucket}/out/transcripts", {"s3": {"endpoint_url": endpoint}}


def test_many_racers_exactly_one_wins(dataset):
    uri, options = dataset
    racers = [_spawn(RACER, uri, f"racer-{i}", json.dumps(options), "60") for i in range(6)]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready", racer.stderr.read()
    for racer in racers:  # all at once
        racer.stdin.write("go\n")
        racer.stdin.flush()
    reports = [_report(racer) for racer in racers]
    winners = [i for i, report in enumerate(reports) if "won" in report]
    assert len(winners) == 1, reports
    winner = winners[0]
    for i, racer in enumerate(racers):
        if i != winner:
            assert racer.wait(timeout=60) == 4
            assert reports[i]["held_by"] == f"racer-{winner}"
            assert f"run racer-{winner} on host" in reports[i]["message"]
    assert read_holder(uri, options).run_id == f"racer-{winner}"
    racers[winner].stdin.write("release\n")
    racers[winner].stdin.flush()
    assert racers[winner].wait(timeout=60) == 0, racers[winner].stderr.read()
    assert read_holder(uri, options) is None
    # Released: the next run takes it at once, at a later generation.
    with Lease.acquire(uri, "after", options, expiry_s=60, wait_s=0) as lease:
        assert lease.holder.generation > reports[winner]["won"]


def test_killed_holder_is_taken_over_after_its_expiry(dataset):
    uri, options = dataset
    expiry_s = 1.0
    _take_then_sigkill(uri, options, "killed", expiry_s)

    # Not before the expiry: a fresh look finds it held (clocks may disagree by a minute here).
    with pytest.raises(LeaseHeld) as held:
        Lease.acquire(uri, "too-early", options, wait_s=0, clock_skew_s=60)
    assert held.value.holder.run_id == "killed"

    started = time.monotonic()
    with Lease.acquire(uri, "rerun", options, expiry_s=30, wait_s=60, clock_skew_s=60) as lease:
        waited_s = time.monotonic() - started
        assert lease.holder.run_id == "rerun"
        assert read_holder(uri, options).run_id == "rerun"
        lease.check()
    assert waited_s >= expiry_s  # it watched the dead lease for the holder's whole expiry


def test_lease_left_long_ago_is_taken_without_watching(dataset):
    uri, options = dataset
    _take_then_sigkill(uri, options, "yesterday", 0.2)
    # Each attempt is a fresh run that waits not at all: only the record's renewal time can free it.
    deadline = time.monotonic() + 30
    while True:
        try:
            lease = Lease.acquire(uri, "next-night", options, wait_s=0, clock_skew_s=0)
            break
        except LeaseHeld as exc:
            assert exc.holder.run_id == "yesterday"
            assert time.monotonic() < deadline, "the stale lease was never taken"
    assert lease.holder.run_id == "next-night"
    lease.release()


def test_run_whose_lease_is_taken_away_stops_before_its_next_commit(dataset, tmp_path):
    uri, options = dataset
    commits = tmp_path / "commits"
    commits.mkdir()
    holder = _spawn(COMMITTER, uri, "paused", json.dumps(options), "1.0", str(commits))
    assert holder.stdout.readline().startswith("holding"), holder.stderr.read()
    holder.stdin.write("1\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "committed 0"

    holder.send_signal(signal.SIGSTOP)  # a driver frozen (GC pause, partition) past its expiry
    try:
        taker = Lease.acquire(uri, "taker", options, expiry_s=60, wait_s=60, clock_skew_s=60)
    finally:
        holder.stdin.write("2\n")
        holder.stdin.flush()
        holder.send_signal(signal.SIGCONT)
    line = holder.stdout.readline()
    assert holder.wait(timeout=60) == 4
    assert line.startswith("lost:") and "taken over by run taker" in line
    assert sorted(os.listdir(commits)) == ["commit-0"]
    taker.check()  # the taker is unaffected by the old holder waking up
    assert read_holder(uri, options).run_id == "taker"
    taker.release()


def test_lost_lease_cannot_be_renewed_or_released_over_the_new_holder(tmp_path):
    uri = str(tmp_path / "transcripts")
    old = Lease.acquire(uri, "old", expiry_s=0.3, renew_every_s=3600)  # stops renewing, as if frozen
    new = Lease.acquire(uri, "new", expiry_s=60, wait_s=30, clock_skew_s=60)
    with pytest.raises(LeaseLost, match="taken over by run new"):
        old.check()
    with pytest.raises(LeaseLost):
        old.renew()
    old.release()  # must not mark the dataset free under the new holder
    assert read_holder(uri).run_id == "new"
    new.check()
    new.release()
    assert read_holder(uri) is None


def test_renewals_keep_the_lease_and_few_records(tmp_path):
    uri = str(tmp_path / "transcripts")
    with Lease.acquire(uri, "long-run", expiry_s=60) as lease:
        first = lease.holder.generation
        for _ in range(5):
            lease.renew()
            lease.check()
        assert lease.holder.generation == first + 5
        assert len(os.listdir(tmp_path / "transcripts" / "_lease")) <= 2
        with pytest.raises(LeaseHeld, match="held by run long-run"):
            Lease.acquire(uri, "other", wait_s=0)


def test_renewal_survives_transient_store_faults(s3_server, s3):
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    proxy = FaultyProxy(s3_server, every=3)
    try:
        options = {"s3": {"endpoint_url": proxy.url}}
        with Lease.acquire(f"s3://{bucket}/out/transcripts", "flaky", options, expiry_s=60) as lease:
            for _ in range(4):
                lease.renew()
                lease.check()
        assert proxy.faults > 0
        assert read_holder(f"s3://{bucket}/out/transcripts", {"s3": {"endpoint_url": s3_server}}) is None
    finally:
        proxy.close()


def test_store_that_ignores_conditional_writes_is_refused(s3_server, s3):
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    proxy = FaultyProxy(s3_server, every=10**9, strip_headers=("If-None-Match",))
    try:
        with pytest.raises(LeaseUnsupported, match="If-None-Match.*lease: none"):
            Lease.acquire(f"s3://{bucket}/out/transcripts", "r", {"s3": {"endpoint_url": proxy.url}})
    finally:
        proxy.close()
    assert read_holder(f"s3://{bucket}/out/transcripts", {"s3": {"endpoint_url": s3_server}}) is None


def test_scheme_without_exclusive_create_is_refused_with_the_opt_out_named():
    with pytest.raises(LeaseUnsupported, match=r"memory:// .*lease: none \(--no-lease\)"):
        Lease.acquire("memory://out/transcripts", "r")
