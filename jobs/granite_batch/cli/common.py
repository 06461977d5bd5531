"""What every command shares: exit codes, argument types, the lease flags, and how a stopped run is reported."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration or manifest: nothing was done
EXIT_MODEL = 3  # the model cannot be loaded: nothing was done
EXIT_RUNTIME = 4  # the job could not run to the end (storage unreachable, cluster failure)
EXIT_TOO_MANY_FAILURES = 5  # the job ran, but more rows failed than --max-failed-fraction allows

log = logging.getLogger("granite_batch")

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([-_][a-z0-9]{2,8})*$", re.IGNORECASE)


def comma_list(value: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"] (blanks dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def prefix_list(value: str) -> list[str]:
    """`--allowed-prefixes`: an allow-list given but empty (`" , "`, from an empty template
    variable) is a usage error (exit 2), never a list that allows everything."""
    if not comma_list(value):
        raise argparse.ArgumentTypeError(f"{value!r} names no prefix; give at least one, or leave the flag out")
    return comma_list(value)


def language_code(value: str) -> str:
    """A language code (`en`, `pt-BR`, `und`): it names a partition and a report file, so nothing
    path-like gets through (exit 2)."""
    if not LANGUAGE_CODE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a language code (e.g. en, pt-BR)")
    return value


def lease_arguments(command: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    command.add_argument(
        "--no-wait",
        action="store_true",
        default=None,
        help="exit 4 at once when another run holds the output (default: wait, see --lease-wait-s)",
    )
    command.add_argument("--lease-wait-s", type=float, help="longest wait for another run's lease (default 3600)")
    command.add_argument(
        "--no-lease",
        action="store_true",
        default=None,
        help="take no lease: for stores without conditional writes; one run at a time is then up to you",
    )


def lease_overrides(args: argparse.Namespace) -> dict:
    return {"lease": "none" if args.no_lease else None, "lease_wait_s": 0.0 if args.no_wait else args.lease_wait_s}


def exit_code(exc: BaseException, what: str) -> int:
    """The one place a command turns what stopped it into a line on stderr and an exit code:
    a bad config or manifest 2, a model that cannot load 3 (also when it failed inside a Ray actor),
    another run holding the output 4, too many failed rows 5, an interrupt 130/143, else 4."""
    from granite_batch.config import ConfigError

    if isinstance(exc, KeyboardInterrupt):
        return interrupted(exc)
    if isinstance(exc, ConfigError):  # before the imports below: a bad config stops before any work
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from granite_batch.inputs.rows import ManifestError
    from granite_batch.models.hub import ModelLoadError
    from granite_batch.run.bookkeeping import TooManyFailures
    from granite_batch.run.lease import LeaseError, LeaseUnsupported

    # Most specific first: LeaseUnsupported is a LeaseError, and a config problem, not a busy output.
    codes: list[tuple[type[BaseException], int, str]] = [
        (LeaseUnsupported, EXIT_CONFIG, ""),
        (LeaseError, EXIT_RUNTIME, ""),  # another run holds the output, or took it over from this one
        (ManifestError, EXIT_CONFIG, "bad manifest: "),
        (ModelLoadError, EXIT_MODEL, ""),
        (TooManyFailures, EXIT_TOO_MANY_FAILURES, ""),
    ]
    for kind, code, prefix in codes:
        if isinstance(exc, kind):
            print(f"granite-batch: {prefix}{exc}", file=sys.stderr)
            return code
    if not isinstance(exc, Exception):
        raise exc
    return could_not_finish(what, exc)


def could_not_finish(what: str, exc: Exception) -> int:
    """Say in one line why a run stopped (details in the debug log); a model that failed to load in a
    Ray actor arrives wrapped in a Ray error and still exits with EXIT_MODEL."""
    reason = str(exc).strip().splitlines()
    if "ModelLoadError" in str(exc):
        line = next((part for part in reason if "cannot load model" in part), reason[-1])
        print(f"granite-batch: {line.split('ModelLoadError: ')[-1]}", file=sys.stderr)
        return EXIT_MODEL
    log.debug("%s failed", what, exc_info=True)
    print(f"granite-batch: {what} failed: {type(exc).__name__}: {reason[0] if reason else ''}", file=sys.stderr)
    return EXIT_RUNTIME


def interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: one line, the exit status a shell gives the signal (130, 143)."""
    from granite_batch.run.bookkeeping import interrupt_signal

    number = interrupt_signal(exc)
    print(
        f"granite-batch: interrupted ({signal.Signals(number).name}): committed rows are kept and the run's "
        "summary says so; run the same command again to finish the rest",
        file=sys.stderr,
    )
    return 128 + number


def exit_now(code: int) -> None:
    """After an interrupt: stop the local Ray within a bound, then exit at once rather than wait
    for its tasks in the interpreter's exit handlers."""
    from granite_batch.pipeline import stop_ray

    stop_ray(timeout_s=30)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
