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

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, FaultyProxy, run_cli, write_jsonl
from granite_batch.output.committed import read_committed
from granite_batch.output.writer import TranscriptWriter
from granite_batch.run.lease import Lease, LeaseHeld, LeaseLost, LeaseUnsupported, read_holder
from granite_batch.schema import transcript_schema
from granite_batch.storage import OutputRoot

# A racer: announce "ready", wait for "go" on stdin, try the lease once (no wait), report, and hold it
# until stdin says "release". Exit 4 when another run holds it, as the job does.
RACER = r"""
import json, sys
from granite_batch.run.lease import Lease, LeaseHeld
from granite_batch.storage import OutputRoot
output, run_id, options, expiry_s = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()
try:
    lease = Lease.acquire(OutputRoot(output, options), "transcripts", run_id, expiry_s=expiry_s, wait_s=0)
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
from granite_batch.run.lease import Lease, LeaseLost
from granite_batch.storage import OutputRoot
output, run_id, options, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[5]
expiry_s = float(sys.argv[4])
lease = Lease.acquire(OutputRoot(output, options), "transcripts", run_id, expiry_s=expiry_s, wait_s=0)
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
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


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
    """(output root URI, storage options) on a local directory or in a fresh bucket on the S3 server
    (its endpoint that evaluates conditional writes atomically, as S3 does)."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    endpoint = request.getfixturevalue("atomic_s3_server")
    s3 = request.getfixturevalue("s3")
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    return f"s3://{bucket}/out", {"s3": {"endpoint_url": endpoint}}


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
    assert read_holder(OutputRoot(uri, options), "transcripts").run_id == f"racer-{winner}"
    racers[winner].stdin.write("release\n")
    racers[winner].stdin.flush()
    assert racers[winner].wait(timeout=60) == 0, racers[winner].stderr.read()
    assert read_holder(OutputRoot(uri, options), "transcripts") is None
    # Released: the next run takes it at once, at a later generation.
    with Lease.acquire(OutputRoot(uri, options), "transcripts", "after", expiry_s=60, wait_s=0) as lease:
        assert lease.holder.generation > reports[winner]["won"]


def test_killed_holder_is_taken_over_after_its_expiry(dataset):
    uri, options = dataset
    expiry_s = 1.0
    _take_then_sigkill(uri, options, "killed", expiry_s)

    # Not before the expiry: a fresh look finds it held (clocks may disagree by a minute here).
    with pytest.raises(LeaseHeld) as held:
        Lease.acquire(OutputRoot(uri, options), "transcripts", "too-early", wait_s=0, clock_skew_s=60)
    assert held.value.holder.run_id == "killed"

    started = time.monotonic()
    with Lease.acquire(
        OutputRoot(uri, options), "transcripts", "rerun", expiry_s=30, wait_s=60, clock_skew_s=60
    ) as lease:
        waited_s = time.monotonic() - started
        assert lease.holder.run_id == "rerun"
        assert read_holder(OutputRoot(uri, options), "transcripts").run_id == "rerun"
        lease.check()
    assert waited_s >= expiry_s  # it watched the dead lease for the holder's whole expiry


def test_lease_left_long_ago_is_taken_without_watching(dataset):
    uri, options = dataset
    _take_then_sigkill(uri, options, "yesterday", 0.2)
    # Each attempt is a fresh run that waits not at all: only the record's renewal time can free it.
    deadline = time.monotonic() + 30
    while True:
        try:
            lease = Lease.acquire(OutputRoot(uri, options), "transcripts", "next-night", wait_s=0, clock_skew_s=0)
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
        taker = Lease.acquire(OutputRoot(uri, options), "transcripts", "taker", expiry_s=60, wait_s=60, clock_skew_s=60)
    finally:
        holder.stdin.write("2\n")
        holder.stdin.flush()
        holder.send_signal(signal.SIGCONT)
    line = holder.stdout.readline()
    assert holder.wait(timeout=60) == 4
    assert line.startswith("lost:") and "taken over by run taker" in line
    assert sorted(os.listdir(commits)) == ["commit-0"]
    taker.check()  # the taker is unaffected by the old holder waking up
    assert read_holder(OutputRoot(uri, options), "transcripts").run_id == "taker"
    taker.release()


def test_lost_lease_cannot_be_renewed_or_released_over_the_new_holder(tmp_path):
    uri = str(tmp_path / "out")
    # Stops renewing, as if frozen.
    old = Lease.acquire(OutputRoot(uri), "transcripts", "old", expiry_s=0.3, renew_every_s=3600)
    new = Lease.acquire(OutputRoot(uri), "transcripts", "new", expiry_s=60, wait_s=30, clock_skew_s=60)
    with pytest.raises(LeaseLost, match="taken over by run new"):
        old.check()
    with pytest.raises(LeaseLost):
        old.renew()
    old.release()  # must not mark the dataset free under the new holder
    assert read_holder(OutputRoot(uri), "transcripts").run_id == "new"
    new.check()
    new.release()
    assert read_holder(OutputRoot(uri), "transcripts") is None


def test_renewals_keep_the_lease_and_few_records(tmp_path):
    uri = str(tmp_path / "out")
    with Lease.acquire(OutputRoot(uri), "transcripts", "long-run", expiry_s=60) as lease:
        first = lease.holder.generation
        for _ in range(5):
            lease.renew()
            lease.check()
        assert lease.holder.generation == first + 5
        assert len(os.listdir(tmp_path / "out" / "_leases" / "transcripts")) <= 2
        with pytest.raises(LeaseHeld, match="held by run long-run"):
            Lease.acquire(OutputRoot(uri), "transcripts", "other", wait_s=0)


def test_renewal_survives_transient_store_faults(s3_server, s3):
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    proxy = FaultyProxy(s3_server, every=3)
    try:
        options = {"s3": {"endpoint_url": proxy.url}}
        with Lease.acquire(OutputRoot(f"s3://{bucket}/out", options), "transcripts", "flaky", expiry_s=60) as lease:
            for _ in range(4):
                lease.renew()
                lease.check()
        assert proxy.faults > 0
        assert read_holder(OutputRoot(f"s3://{bucket}/out", {"s3": {"endpoint_url": s3_server}}), "transcripts") is None
    finally:
        proxy.close()


def test_store_that_ignores_conditional_writes_is_refused(s3_server, s3):
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    proxy = FaultyProxy(s3_server, every=10**9, strip_headers=("If-None-Match",))
    try:
        with pytest.raises(LeaseUnsupported, match="If-None-Match.*lease: none"):
            Lease.acquire(OutputRoot(f"s3://{bucket}/out", {"s3": {"endpoint_url": proxy.url}}), "transcripts", "r")
    finally:
        proxy.close()
    assert read_holder(OutputRoot(f"s3://{bucket}/out", {"s3": {"endpoint_url": s3_server}}), "transcripts") is None


def test_scheme_without_exclusive_create_is_refused_with_the_opt_out_named():
    with pytest.raises(LeaseUnsupported, match=r"memory:// .*lease: none \(--no-lease\)"):
        Lease.acquire(OutputRoot("memory://out"), "transcripts", "r")


def test_status_shows_who_holds_the_output(tmp_path):
    output = str(tmp_path / "out")
    with Lease.acquire(OutputRoot(output), "transcripts", "nightly", expiry_s=60):
        held = run_cli(["status", output])
    assert held.returncode == 0, held.stderr
    assert "lease on transcripts: held by run nightly on host" in held.stdout
    assert "stale after 60 s unrenewed" in held.stdout
    free = run_cli(["status", output])
    assert "lease on transcripts: free" in free.stdout


def _rows(ids: list[str], run_id: str) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"id": i, "audio": f"{i}.wav", "language": "en", "task": "asr", "text": i, "model": "m", "run_id": run_id}
            for i in ids
        ],
        schema=transcript_schema(),
    )


def test_writer_stops_before_committing_once_its_lease_is_taken_away(tmp_path):
    output = str(tmp_path / "out")
    old = Lease.acquire(OutputRoot(output), "transcripts", "old", expiry_s=0.3, renew_every_s=3600)
    writer = TranscriptWriter(OutputRoot(output), "old", transcript_schema(), rows_per_file=1, before_commit=old.check)
    writer.write(_rows(["a"], "old"))
    assert len(writer.committed) == 1
    new = Lease.acquire(OutputRoot(output), "transcripts", "new", expiry_s=60, wait_s=30, clock_skew_s=60)
    with pytest.raises(LeaseLost, match="taken over by run new"):
        writer.write(_rows(["b"], "old"))
    assert len(writer.committed) == 1
    assert read_committed(OutputRoot(output)).ids().to_pylist() == ["a"]
    new.release()


# --- whole jobs: `granite-batch run` twice on one output, at the same time -----------------------------


def _job(manifest, output: str, model, run_id: str, *extra: str) -> subprocess.Popen:
    args = [
        "run",
        "--manifest",
        str(manifest),
        "--output",
        output,
        "--model",
        str(model),
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--run-id",
        run_id,
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "granite_batch.cli", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _manifest(tmp_path, count: int = 6):
    names = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "es_mercado.m4a", "pt_praia.wav"]
    rows = [
        {"audio": str(SAMPLES / names[i % len(names)]), "language": names[i % len(names)][:2], "id": f"row-{i}"}
        for i in range(count)
    ]
    return write_jsonl(tmp_path / "m.jsonl", rows)


@pytest.mark.slow
def test_two_runs_started_together_on_a_local_root_one_waits_for_the_other(tmp_path, tiny_model_dir):
    manifest, output = _manifest(tmp_path), str(tmp_path / "out")
    jobs = {name: _job(manifest, output, tiny_model_dir, name, "--lease-wait-s", "300") for name in ("one", "two")}
    results = {name: (job.wait(timeout=600), *job.communicate()) for name, job in jobs.items()}
    for name, (code, _, stderr) in results.items():
        assert code == 0, (name, stderr[-3000:])
    rows = pads.dataset(tmp_path / "out" / "transcripts", format="parquet", partitioning="hive").to_table()
    ids = rows.column("id").to_pylist()
    assert sorted(ids) == sorted(f"row-{i}" for i in range(6))  # every id exactly once
    summaries = {name: json.loads((tmp_path / "out" / "runs" / f"{name}.json").read_text()) for name in jobs}
    worker = next(name for name, s in summaries.items() if s["rows_written"] == 6)
    waiter = "two" if worker == "one" else "one"
    assert summaries[waiter]["rows_written"] == 0 and summaries[waiter]["rows_already_done"] == 6
    assert f"is held by run {worker} on host" in results[waiter][2]
    assert set(rows.column("run_id").to_pylist()) == {worker}


def test_two_runs_started_together_on_s3_the_second_exits_4_naming_the_holder(
    tmp_path, tiny_model_dir, atomic_s3_server, s3
):
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    manifest, output = _manifest(tmp_path), f"s3://{bucket}/out"
    extra = ("--endpoint-url", atomic_s3_server, "--no-wait")
    jobs = {name: _job(manifest, output, tiny_model_dir, name, *extra) for name in ("one", "two")}
    results = {name: (job.wait(timeout=600), *job.communicate()) for name, job in jobs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 4], {name: (code, err[-2000:]) for name, (code, _, err) in results.items()}
    worker = next(name for name, (code, _, _) in results.items() if code == 0)
    refused = next(name for name, (code, _, _) in results.items() if code == 4)
    message = results[refused][2]
    assert f"s3://{bucket}/out/transcripts is held by run {worker} on host" in message and "started 20" in message
    table = pads.dataset(f"{bucket}/out/transcripts", filesystem=s3, format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(f"row-{i}" for i in range(6))
    assert not s3.exists(f"{bucket}/out/runs/{refused}.json")  # the refused run did nothing at all
    assert read_holder(OutputRoot(output, {"s3": {"endpoint_url": atomic_s3_server}}), "transcripts") is None


def test_job_on_a_store_without_exclusive_create_stops_with_exit_2_naming_the_opt_out(tmp_path, tiny_model_dir):
    result = run_cli(
        [
            "run",
            "--manifest",
            str(_manifest(tmp_path, 2)),
            "--output",
            "memory://lease-test/out",
            "--model",
            str(tiny_model_dir),
            "--no-progress",
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot take a lease on memory://lease-test/out/transcripts" in result.stderr
    assert "--no-lease" in result.stderr


def test_second_pass_takes_a_lease_on_its_own_dataset(tmp_path):
    output = str(tmp_path / "out")
    writer = TranscriptWriter(OutputRoot(output), "transcribed", transcript_schema())
    writer.write(_rows(["a", "b"], "transcribed"))
    writer.close()
    tiny_lm = tmp_path / "tiny-lm"
    assert run_cli(["tiny-lm", str(tiny_lm)]).returncode == 0
    # A run holding the transcripts does not stop a second pass; one holding its dataset does.
    with (
        Lease.acquire(OutputRoot(output), "transcripts", "transcribing", expiry_s=60),
        Lease.acquire(OutputRoot(output), "second_pass/summary", "summarising", expiry_s=60),
    ):
        refused = run_cli(
            ["second-pass", output, "--model", str(tiny_lm), "--max-new-tokens", "16", "--no-wait", "--no-progress"]
        )
    assert refused.returncode == 4, refused.stderr[-2000:]
    assert f"{output}/second_pass/summary is held by run summarising on host" in refused.stderr
    assert not (tmp_path / "out" / "second_pass" / "summary" / "_runs").exists()
