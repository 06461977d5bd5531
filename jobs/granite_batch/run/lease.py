"""A lease on a dataset under the output root, so two runs never write the same dataset at once.

The lease is a sequence of small JSON records, one per *generation*, beside the datasets:

    OUTPUT/_leases/transcripts/000000000007.json   {run_id, host, pid, started_at, renewed_at, expiry_s, ...}
    OUTPUT/_leases/second_pass/<name>/...          a second pass's dataset has its own

The record with the highest generation says who holds the dataset. Every change (taking the lease,
renewing it, taking over a stale one, releasing it) is the creation of the *next* generation with an
exclusive create, so of two runs that try the same change exactly one succeeds:

- local and POSIX filesystems (NFS included): the record is written to a unique file, then hard-linked
  to its generation's name; `link(2)` fails if the name exists. This is the lock-file recipe of the
  Linux open(2) man page for NFS, where O_EXCL is not reliable (a link that reports failure but raised
  the unique file's link count to 2 also succeeded).
- S3 and S3-compatible stores: PutObject with `If-None-Match: *` (AWS S3 conditional writes,
  https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html), and S3-compatible
  stores that honour it (moto's server does; others were not tried here). A store that silently
  ignores the header is found out when the lease is taken (a second exclusive create of the same key
  must fail) and refused.
- other fsspec schemes: refused with `LeaseUnsupported`; the job's `lease: none` is the explicit
  opt-out (one run at a time is then the operator's promise), never silent sharing.

Renewal writes the next generation every `expiry_s / 3`. A lease is stale, and may be taken over,
when it went unrenewed for its holder's `expiry_s`: either this process watched the same generation
for that long (its own monotonic clock, so hosts' clocks do not matter), or the record's renewal time
is older than the expiry plus `clock_skew_s` (default: one more expiry) by this host's clock, so a
lease left by a driver killed yesterday is taken at once. A holder that cannot renew for `expiry_s / 2`
confirms the lease before its next commit, and a holder whose generation was superseded by another
run raises `LeaseLost` from `check()`: it stops before committing another file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from granite_batch.config import DEFAULT_EXPIRY_S, DEFAULT_WAIT_S
from granite_batch.storage import OutputRoot, protocol_of

log = logging.getLogger(__name__)

LEASES_DIR = "_leases"  # OUTPUT/_leases/<dataset>/: beside the datasets, so readers of one never see it


_RECORD = re.compile(r"^(\d{12})\.json$")


class LeaseError(RuntimeError):
    """Base class of the lease's errors."""


class LeaseHeld(LeaseError):
    """Another run holds the dataset (and waiting was off or ran out); `holder` says who."""

    def __init__(self, dataset: str, holder: Holder, waited_s: float):
        self.dataset, self.holder, self.waited_s = dataset, holder, waited_s
        waited = f" after waiting {waited_s:.0f} s" if waited_s > 0 else ""
        super().__init__(
            f"{dataset} is held by {holder.describe()}{waited}; "
            f"the lease expires if that run stops renewing it for {holder.expiry_s:g} s"
        )


class LeaseLost(LeaseError):
    """This run's lease was taken over (or could not be renewed in time): it must stop writing."""


class LeaseUnsupported(LeaseError):
    """The store cannot do an exclusive create, so no lease can be taken; the message says what to do."""


@dataclass(frozen=True)
class Holder:
    """One lease record: who holds (or released) the dataset, as of one generation."""

    run_id: str
    host: str
    pid: int
    started_at: str
    renewed_at: str
    expiry_s: float
    token: str
    generation: int = 0
    released: bool = False

    def describe(self) -> str:
        return (
            f"run {self.run_id} on host {self.host} (pid {self.pid}), started {self.started_at}, "
            f"last renewed {self.renewed_at}"
        )

    def renewed_age_s(self) -> float | None:
        """Seconds since the record's renewal time by this host's clock (None if unreadable)."""
        try:
            renewed = datetime.fromisoformat(self.renewed_at)
        except (TypeError, ValueError):
            return None
        return (datetime.now(UTC) - renewed).total_seconds()

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, generation: int, default_expiry_s: float) -> Holder:
        try:
            raw = json.loads(data)
            return cls(
                run_id=str(raw["run_id"]),
                host=str(raw.get("host", "?")),
                pid=int(raw.get("pid", -1)),
                started_at=str(raw.get("started_at", "?")),
                renewed_at=str(raw.get("renewed_at", "?")),
                expiry_s=float(raw.get("expiry_s", default_expiry_s)),
                token=str(raw.get("token", "")),
                generation=generation,
                released=bool(raw.get("released", False)),
            )
        except (ValueError, KeyError, TypeError):
            # Not ours or damaged: held by someone unknown, stale after an expiry of watching.
            return cls("unknown", "?", -1, "?", "?", default_expiry_s, "", generation)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


class _LocalStore:
    """Lease records in a local or POSIX (NFS) directory: exclusive create by hard link."""

    def __init__(self, directory: str):
        self.directory = directory

    def generations(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_RECORD.match, names) if m)

    def read(self, generation: int) -> bytes | None:
        try:
            with open(os.path.join(self.directory, _name(generation)), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def create(self, generation: int, data: bytes) -> bool:
        os.makedirs(self.directory, exist_ok=True)
        unique = os.path.join(self.directory, f".{uuid.uuid4().hex}.tmp")
        with open(unique, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(unique, os.path.join(self.directory, _name(generation)))
            return True
        except FileExistsError:
            return os.stat(unique).st_nlink == 2  # NFS: the link was made, its answer was lost
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise LeaseUnsupported(
                    f"the filesystem of {self.directory} cannot make hard links, so no lease can be taken "
                    f"({exc.strerror}); run one job at a time on this output and set lease: none (--no-lease)"
                ) from exc
            raise
        finally:
            os.unlink(unique)

    def delete(self, generation: int) -> None:
        try:
            os.unlink(os.path.join(self.directory, _name(generation)))
        except FileNotFoundError:
            pass


class _ConditionalPutStore:
    """Lease records as objects on S3 or an S3-compatible store: exclusive create by `If-None-Match: *`."""

    def __init__(self, fs, directory: str):
        self.fs, self.directory = fs, directory

    def generations(self) -> list[int]:
        try:
            names = self.fs.ls(self.directory, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in (_RECORD.match(posixpath.basename(n)) for n in names) if m)

    def read(self, generation: int) -> bytes | None:
        try:
            return self.fs.cat_file(posixpath.join(self.directory, _name(generation)))
        except FileNotFoundError:
            return None

    def create(self, generation: int, data: bytes) -> bool:
        path = posixpath.join(self.directory, _name(generation))
        try:
            self.fs.pipe_file(path, data, mode="create")  # PutObject with IfNoneMatch="*" (s3fs)
            return True
        except FileExistsError:
            # Ours if a retried PUT found its own first attempt (the first answer was lost).
            return self.read(generation) == data
        except OSError:
            # 409 ConditionalRequestConflict (two creates at once) or a transient failure after retries:
            # whoever's record is there now won; nothing there means nobody did.
            existing = self.read(generation)
            if existing is None:
                raise
            return existing == data
        finally:
            self.fs.invalidate_cache(self.directory)

    def honours_exclusive_create(self, generation: int, data: bytes) -> bool:
        """Whether a second exclusive create of an existing record fails, as it must."""
        try:
            self.fs.pipe_file(posixpath.join(self.directory, _name(generation)), data, mode="create")
        except FileExistsError:
            return True
        return False

    def delete(self, generation: int) -> None:
        try:
            self.fs.rm_file(posixpath.join(self.directory, _name(generation)))
        except FileNotFoundError:
            pass


def _store(output: OutputRoot, dataset_dir: str):
    dataset_uri = posixpath.join(output.uri, dataset_dir)
    protocol = protocol_of(output.uri)
    directory = output.join(LEASES_DIR, dataset_dir)
    if output.local:
        return _LocalStore(directory)
    if protocol == "s3":
        return _ConditionalPutStore(output.fs, directory)
    raise LeaseUnsupported(
        f"granite-batch cannot take a lease on {dataset_uri}: {protocol}:// is not a store whose exclusive "
        f"create it knows (local/POSIX files, or S3 and S3-compatible stores with conditional writes). "
        f"Make sure only one run at a time writes this output and set lease: none (--no-lease)"
    )


def _latest(store, default_expiry_s: float) -> Holder | None:
    """The record of the highest generation, or None when there is none yet."""
    while True:
        generations = store.generations()
        if not generations:
            return None
        data = store.read(generations[-1])
        if data is not None:
            return Holder.from_bytes(data, generations[-1], default_expiry_s)


def read_holder(output: OutputRoot, dataset_dir: str) -> Holder | None:
    """Who holds the lease on dataset `dataset_dir` of `output` now (the latest record, expired or
    not); None if nobody does."""
    try:
        holder = _latest(_store(output, dataset_dir), DEFAULT_EXPIRY_S)
    except LeaseUnsupported:
        return None
    return None if holder is None or holder.released else holder


class Lease:
    """A held lease on a dataset, renewed from a background thread until `release()`.

    Take one with `Lease.acquire(...)`, use it as a context manager, and call `check()` before each
    commit of data: it raises `LeaseLost` once another run took the dataset over.
    """

    def __init__(self, store, dataset_uri: str, holder: Holder, renew_every_s: float, confirmed_at: float):
        self.dataset_uri = dataset_uri
        self.holder = holder
        self._store = store
        self._renew_every_s = renew_every_s
        self._confirmed_at = confirmed_at  # monotonic time before the write that confirmed it: conservative
        self._lost: LeaseLost | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{holder.run_id}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(
        cls,
        output: OutputRoot,
        dataset_dir: str,
        run_id: str,
        *,
        expiry_s: float = DEFAULT_EXPIRY_S,
        wait_s: float = DEFAULT_WAIT_S,
        poll_s: float | None = None,
        renew_every_s: float | None = None,
        clock_skew_s: float | None = None,
    ) -> Lease:
        """Take the lease on dataset `dataset_dir` (e.g. "transcripts") of `output` for `run_id`,
        waiting up to `wait_s` seconds while another run holds it.

        Raises LeaseHeld (naming the holder) when the wait runs out (at once with `wait_s=0`), and
        LeaseUnsupported when the store has no exclusive create. `renew_every_s` defaults to
        `expiry_s / 3`; `clock_skew_s` (default: the holder's expiry) is how far hosts' clocks may
        disagree before a lease is judged stale by its renewal time alone.
        """
        if expiry_s <= 0:
            raise ValueError("expiry_s must be positive")
        store = _store(output, dataset_dir)
        dataset_uri = posixpath.join(output.uri, dataset_dir)
        poll_s = poll_s if poll_s is not None else max(0.05, min(10.0, expiry_s / 10))
        renew_every_s = renew_every_s if renew_every_s is not None else expiry_s / 3
        started = time.monotonic()
        deadline = started + max(0.0, wait_s)
        watched: tuple[int, float] | None = None  # (generation, when this process first saw it)
        announced = None
        token = uuid.uuid4().hex
        while True:
            now = time.monotonic()
            latest = _latest(store, expiry_s)
            if latest is not None and (watched is None or watched[0] != latest.generation):
                watched = (latest.generation, now)
            if latest is None or latest.released or _stale(latest, now - watched[1], clock_skew_s):
                if latest is not None and not latest.released:
                    log.warning("taking over the stale lease on %s from %s", dataset_uri, latest.describe())
                attempt_at, stamp = time.monotonic(), _now()
                holder = Holder(
                    run_id,
                    socket.gethostname(),
                    os.getpid(),
                    stamp,
                    stamp,
                    expiry_s,
                    token,
                    generation=(latest.generation + 1) if latest else 1,
                )
                data = holder.to_bytes()
                if store.create(holder.generation, data):
                    try:
                        honoured = not isinstance(store, _ConditionalPutStore) or store.honours_exclusive_create(
                            holder.generation, data
                        )
                    except BaseException:
                        store.delete(holder.generation)  # not left behind to block the next run
                        raise
                    if not honoured:
                        store.delete(holder.generation)
                        raise LeaseUnsupported(
                            f"the store of {dataset_uri} accepted an object over an existing one despite "
                            f"If-None-Match: *, so it cannot hold a lease; run one job at a time on this "
                            f"output and set lease: none (--no-lease)"
                        )
                    _prune(store, holder.generation)
                    log.info("took the lease on %s for run %s (generation %d)", dataset_uri, run_id, holder.generation)
                    return cls(store, dataset_uri, holder, renew_every_s, attempt_at)
                continue  # another run made that generation first: look again
            if now >= deadline:
                raise LeaseHeld(dataset_uri, latest, now - started)
            if announced != latest.run_id:
                announced = latest.run_id
                log.warning(
                    "%s is held by %s; waiting up to %.0f s for it (--no-wait stops at once)",
                    dataset_uri,
                    latest.describe(),
                    max(0.0, deadline - now),
                )
            time.sleep(min(poll_s, max(0.0, deadline - now)))

    def renew(self) -> None:
        """Write the next generation of this run's record; raise LeaseLost if another run took over."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            attempt_at = time.monotonic()
            current = self._store.generations()
            if current[-1:] != [self.holder.generation]:
                self._lose_to_latest()
            renewed = Holder(**{**asdict(self.holder), "renewed_at": _now(), "generation": self.holder.generation + 1})
            if not self._store.create(renewed.generation, renewed.to_bytes()):
                self._lose_to_latest()
            self.holder = renewed
            self._confirmed_at = attempt_at
            _prune(self._store, renewed.generation)

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds the lease with at least half an expiry to go.

        Cheap when the lease was renewed recently (one listing); renews first when it was not.
        """
        if self._lost is not None:
            raise self._lost
        if time.monotonic() - self._confirmed_at > self.holder.expiry_s / 2:
            self.renew()
            return
        with self._lock:  # not while the renewal thread is between writing a generation and noting it
            if self._lost is not None:
                raise self._lost
            if self._store.generations()[-1:] != [self.holder.generation]:
                self._lose_to_latest()

    def release(self) -> None:
        """Stop renewing and mark the dataset free (a released record), unless it was taken over."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._lost is not None:
                return
            released = Holder(
                **{
                    **asdict(self.holder),
                    "renewed_at": _now(),
                    "released": True,
                    "generation": self.holder.generation + 1,
                }
            )
            try:
                if self._store.create(released.generation, released.to_bytes()):
                    _prune(self._store, released.generation)
                    self._lost = LeaseLost(f"the lease on {self.dataset_uri} was released")
                    log.info("released the lease on %s (run %s)", self.dataset_uri, self.holder.run_id)
            except Exception as exc:  # it expires on its own; the run's own outcome matters more
                log.warning(
                    "could not release the lease on %s (%s); it expires after %g s",
                    self.dataset_uri,
                    exc,
                    self.holder.expiry_s,
                )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _lose_to_latest(self) -> None:
        """Record and raise that another generation superseded ours (call with the lock held)."""
        latest = _latest(self._store, self.holder.expiry_s)
        by = latest.describe() if latest is not None else "nobody: the lease records were removed"
        self._lost = LeaseLost(f"run {self.holder.run_id} lost its lease on {self.dataset_uri}, taken over by {by}")
        log.error("%s", self._lost)
        raise self._lost

    def _renew_loop(self) -> None:
        interval = self._renew_every_s
        while not self._stop.wait(interval):
            try:
                self.renew()
                interval = self._renew_every_s
            except LeaseLost:
                return
            except Exception as exc:  # transient store trouble: retry soon; give up once it may have expired
                if time.monotonic() - self._confirmed_at >= self.holder.expiry_s:
                    with self._lock:
                        self._lost = LeaseLost(
                            f"run {self.holder.run_id} could not renew its lease on "
                            f"{self.dataset_uri} within {self.holder.expiry_s:g} s: {exc}"
                        )
                    log.error("%s", self._lost)
                    return
                log.warning("could not renew the lease on %s (%s); retrying", self.dataset_uri, exc)
                interval = min(self._renew_every_s, max(0.05, self.holder.expiry_s / 10))


def _stale(holder: Holder, watched_s: float, clock_skew_s: float | None) -> bool:
    if watched_s >= holder.expiry_s:
        return True
    age = holder.renewed_age_s()
    allowance = holder.expiry_s if clock_skew_s is None else clock_skew_s
    return age is not None and age > holder.expiry_s + allowance


def _prune(store, generation: int) -> None:
    """Delete records older than the one before `generation` (best effort)."""
    for old in store.generations():
        if old < generation - 1:
            try:
                store.delete(old)
            except OSError:
                return


class NoLease:
    """What a run holds when the operator opted out (`lease: none`): every check passes."""

    def __init__(self, dataset_uri: str):
        self.dataset_uri = dataset_uri
        self.holder = None

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self) -> NoLease:
        return self

    def __exit__(self, *exc_info) -> None:
        pass


@dataclass(frozen=True)
class LeaseTerms:
    """How a run holds its lease: `mode` "auto" (take one), "none" (the operator's opt-out) or "table"
    (none needed: a table format's commits keep one row per id, output/delta.py), the
    expiry after which an unrenewed lease may be taken over, and how long to wait for another run's."""

    mode: str = "auto"
    expiry_s: float = DEFAULT_EXPIRY_S
    wait_s: float = DEFAULT_WAIT_S


def take_lease(output: OutputRoot, dataset_dir: str, run_id: str, terms: LeaseTerms = LeaseTerms()) -> Lease | NoLease:
    """The lease a run holds on dataset `dataset_dir` of `output` while it writes: a `Lease`, or a
    `NoLease` when the operator opted out (mode "none"). Raises LeaseHeld / LeaseUnsupported as
    `Lease.acquire`."""
    dataset_uri = posixpath.join(output.uri, dataset_dir)
    if terms.mode == "table":
        return NoLease(dataset_uri)
    if terms.mode == "none":
        log.warning("no lease on %s (lease: none): make sure no other run writes it at the same time", dataset_uri)
        return NoLease(dataset_uri)
    return Lease.acquire(output, dataset_dir, run_id, expiry_s=terms.expiry_s, wait_s=terms.wait_s)


def discard_own_records(output: OutputRoot, run_id: str) -> None:
    """Remove `OUTPUT/_leases` when every record in it is `run_id`'s: a run that stopped before any
    work, in an output root it created, leaves nothing behind. Another run's record keeps them all."""
    fs, folder = output.fs, output.join(LEASES_DIR)
    if not fs.exists(folder):
        return
    for path in fs.find(folder):
        try:
            with fs.open(path, "rb") as handle:
                if json.loads(handle.read()).get("run_id") != run_id:
                    return
        except (OSError, ValueError):
            return
    fs.rm(folder, recursive=True)


def describe_leases(output: OutputRoot) -> list[str]:
    """A line for the transcripts' lease (free or who holds it), and one per held second-pass lease."""
    from granite_batch.schema import SECOND_PASS_DIR, TRANSCRIPTS_DIR

    fs, folder = output.fs, output.join(SECOND_PASS_DIR)
    passes = sorted(posixpath.basename(p) for p in fs.ls(folder, detail=False)) if fs.isdir(folder) else []
    lines = []
    for dataset in [TRANSCRIPTS_DIR] + [posixpath.join(SECOND_PASS_DIR, name) for name in passes]:
        holder = read_holder(output, dataset)
        if holder is None:
            if dataset == TRANSCRIPTS_DIR:
                lines.append(f"lease on {dataset}: free")
            continue
        age = holder.renewed_age_s()
        state = (f"renewed {age:.0f} s ago" if age is not None else "renewal time unknown") + (
            f"; stale after {holder.expiry_s:g} s unrenewed, then the next run takes it over"
        )
        lines.append(f"lease on {dataset}: held by {holder.describe()} ({state})")
    return lines
