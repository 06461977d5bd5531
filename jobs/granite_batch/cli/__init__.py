"""`granite-batch`: run a transcription job, or write a tiny checkpoint for tests and trials.

One module per command: each has `register(commands)`, which adds its parser and sets its handler.
"""

from __future__ import annotations

import argparse
import logging
import signal

from granite_batch.cli import checkpoints, compact, config, evaluate, gc, run, second_pass, status, transcribe
from granite_batch.cli.common import (
    EXIT_CONFIG,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_TOO_MANY_FAILURES,
    exit_now,
)

__all__ = ["EXIT_CONFIG", "EXIT_MODEL", "EXIT_OK", "EXIT_RUNTIME", "EXIT_TOO_MANY_FAILURES", "main"]

# In the order `--help` lists them.
REGISTER = (
    run.register,
    transcribe.register,
    config.register,
    status.register,
    gc.register,
    checkpoints.register_tiny_model,
    second_pass.register,
    checkpoints.register_tiny_lm,
    evaluate.register,
    compact.register,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granite-batch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for register in REGISTER:
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # ray.data: its INFO lines name internal operators; the job logs its own progress (run/progress.py).
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler = args.handler
    if args.command in ("run", "second-pass", "transcribe"):
        from granite_batch.run.bookkeeping import on_interrupt

        for number in (signal.SIGINT, signal.SIGTERM):  # a clean stop: committed rows stay, counted exactly
            signal.signal(number, on_interrupt)
    code = handler(args)
    if args.command in ("run", "second-pass", "transcribe"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the run is over: nothing left to stop cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        exit_now(code)
    return code
