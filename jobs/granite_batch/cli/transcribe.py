"""`granite-batch transcribe FILE...`: a handful of files to text, subtitles or JSON beside each other,
named by each file's stem, as WhisperX, faster-whisper and IBM's `granite-speech` do.

It runs the same job as `run` (same models, routing and flags: they are `run`'s own, taken from its
parser) over a manifest of the files, into a temporary output root, then writes one file per format
per input. Outputs are named `<stem>.<format>`; when two inputs share a stem (a/talk.wav, b/talk.mp3)
each takes its whole file name instead (`talk.wav.srt`, `talk.mp3.srt`), and a name still taken
(a/talk.wav, b/talk.wav) gets `-2`, `-3`... in the order the files were given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from granite_batch.cli import run
from granite_batch.cli.common import EXIT_OK, exit_code, interrupted

FORMATS = ("txt", "srt", "vtt", "json")
# `run` flags that name the job's inputs, output or run bookkeeping: a files command sets them itself.
NOT_TAKEN = {"help", "manifest", "input", "output", "run_id", "retry_failed", "subtitles", "reference_column"}
NOT_TAKEN |= {"no_wait", "lease_wait_s", "no_lease", "format", "redo_model", "redo_where"}


def register(commands: argparse._SubParsersAction) -> None:
    transcribe = commands.add_parser(
        "transcribe",
        help="transcribe/translate a few files into txt, srt, vtt or json named by each file's stem",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    transcribe.add_argument("files", nargs="+", metavar="FILE", help="recordings: paths or URIs")
    transcribe.add_argument(
        "--format",
        dest="formats",
        default="txt",
        type=_formats,
        help=f"comma-separated output formats: {', '.join(FORMATS)}, or all (default txt)",
    )
    transcribe.add_argument("--output-dir", default=".", help="folder for the outputs (default: the current one)")
    for action in _run_parser()._actions:
        if action.dest not in NOT_TAKEN:
            transcribe._add_action(action)
    defaults = {action.dest: action.default for action in _run_parser()._actions if action.dest in NOT_TAKEN}
    transcribe.set_defaults(handler=_cmd_transcribe, **{k: v for k, v in defaults.items() if k != "help"})


def _run_parser() -> argparse.ArgumentParser:
    """`run`'s own parser, whose model, request and decoding flags this command takes as they are."""
    commands = argparse.ArgumentParser().add_subparsers()
    run.register(commands)
    return commands.choices["run"]


def _formats(value: str) -> list[str]:
    formats = list(FORMATS) if value.strip() == "all" else [f.strip() for f in value.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(unknown) or value!r}: choose from {FORMATS}")
    return formats


def output_names(files: list[str]) -> list[str]:
    """Each file's output name without extension: its stem, its whole name where stems clash, and
    `-2`, `-3`... where even those clash, in the order given."""
    names = [Path(f.split("://", 1)[-1]).name for f in files]
    stems = [Path(name).stem for name in names]
    clashing = Counter(stems)
    chosen = [stem if clashing[stem] == 1 else name for stem, name in zip(stems, names)]
    seen: Counter[str] = Counter()
    out = []
    for name in chosen:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def render(row: dict, output_format: str) -> str:
    """One transcript row as a file of `output_format`."""
    from granite_batch.output.subtitles import to_srt, to_vtt

    segments = row.get("segments") or []
    if output_format == "srt":
        return to_srt(segments)
    if output_format == "vtt":
        return to_vtt(segments)
    if output_format == "json":
        keep = ("audio", "language", "task", "target_language", "text", "segments", "language_detected")
        more = ("duration_s", "error", "model", "model_revision")
        return json.dumps({key: row.get(key) for key in keep + more}, ensure_ascii=False, indent=2) + "\n"
    return (row.get("text") or "") + "\n"


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from granite_batch.run.transcription import transcribe_files

    overrides = {key: value for key, value in run._overrides(args).items() if value is not None}
    for key in ("manifest", "input", "output", "run_id"):
        overrides.pop(key, None)
    folder = Path(args.output_dir)
    ids = [f"file-{n}" for n in range(len(args.files))]  # one row per file given, even a file given twice
    rows = [{"audio": path, "id": row_id} for path, row_id in zip(args.files, ids)]
    with tempfile.TemporaryDirectory(prefix="granite-batch-transcribe-") as work:
        try:
            table = transcribe_files(
                rows, Path(work) / "out", progress=not args.no_progress, config_path=args.config, **overrides
            )
        except KeyboardInterrupt as exc:
            return interrupted(exc)
        except Exception as exc:
            return exit_code(exc, "job")
    by_id = {row["id"]: row for row in table.to_pylist()}
    folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path, row_id, name in zip(args.files, ids, output_names(args.files)):
        row = by_id[row_id]
        if row["error"] is not None:
            failed += 1
            print(f"{path}: {row['error']}", file=sys.stderr)
            continue
        for output_format in args.formats:
            target = folder / f"{name}.{output_format}"
            target.write_text(render(row, output_format), encoding="utf-8")
            print(f"{path} -> {target}")
    print(f"{len(args.files) - failed} of {len(args.files)} files transcribed")
    return EXIT_OK
