"""mkdocs hook: the reference pages are generated from the code at build time.

A page writes a marker such as `<!-- generated: config -->` on a line of its own and this hook
replaces it with tables read from the code: the pydantic JobConfig (config.py), the argparse parser
(cli/), the Arrow schemas (schema.py), the exit codes (cli/common.py) and the public Python functions.
A field, flag or column the code gains without a description here or in the code fails the strict
build (a warning), so the reference cannot fall behind silently. The notebooks/ folder is added to
the site as it is, for mkdocs-jupyter to render with their saved outputs.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import sys
import types
import typing
from pathlib import Path

import yaml
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
# Document this checkout's code, whatever an installed copy of the package points at.
sys.path.insert(0, str(ROOT / "jobs"))

from granite_batch import cli, config, schema  # noqa: E402

log = logging.getLogger("mkdocs.plugins.granite_batch_reference")
MARKER = re.compile(r"^<!-- generated: ([a-z_-]+) -->$", re.MULTILINE)
NOTEBOOKS = ROOT / "notebooks"

# Config fields whose Field() carries no description yet; the code's own description wins when it has one.
CONFIG_NOTES = {
    "JobConfig.output": "output dataset root: a local folder or a URI (`s3://`, `gs://`, ...)",
    "JobConfig.model": "Hub id or local folder of the speech model; `models` overrides it",
    "JobConfig.revision": "branch, tag or commit of `model`",
    "JobConfig.task": "`asr` (transcribe) or `ast` (translate), for rows that do not say",
    "JobConfig.target_language": "translation target for `ast` rows that do not name one",
    "JobConfig.keywords": "keyword-biasing terms for rows without their own `keywords`",
    "JobConfig.max_segment_s": "longest speech segment handed to the model; longer speech is cut in pauses",
    "JobConfig.max_duration_s": "a longer recording becomes an error row as soon as the decoder passes this point",
    "JobConfig.sample_rate_hz": "the rate every recording is resampled to (the model's)",
    "JobConfig.generation": "decoding settings, below",
    "JobConfig.resources": "what the job asks Ray for, below",
    "JobConfig.device": "`auto`: CUDA when the model actor has a GPU, else CPU",
    "JobConfig.dtype": "`auto`: bfloat16 on a GPU, float32 on the CPU",
    "JobConfig.trust_remote_code": "run Python code shipped inside the model repository on every worker, with the "
    "job's credentials; only for a repository you have read and pinned with `revision`",
    "JobConfig.max_failed_fraction": "exit 5 when more than this share of rows failed (after writing everything)",
    "JobConfig.run_id": "name of this run; default: UTC start time and a random suffix",
    "GenerationOptions.num_beams": "beam search width; 1 is greedy, as the model cards decode",
    "GenerationOptions.repetition_penalty": "transformers' repetition penalty; 1.0 is none",
    "GenerationOptions.decoding": "`autoregressive`, `speculative-strict` (CTC drafts, output identical to greedy) "
    "or `speculative` (IBM's relaxed acceptance); see [How inference is done](../explanation/inference.md)",
    "Resources.cpus_per_actor": "CPUs per model actor",
    "Resources.accelerator_type": "Ray accelerator type the model actors need, e.g. `H100`",
    "ModelSpec.model": "Hub id or local folder of this model",
    "ModelSpec.revision": "branch, tag or commit of this model",
    "SecondPassOptions.model": "causal language model: Hub id or local folder",
    "SecondPassOptions.revision": "branch, tag or commit of the language model",
    "SecondPassOptions.max_new_tokens": "generation limit per prompt",
    "SecondPassOptions.device": "`auto`: CUDA when the actor has a GPU, else CPU",
    "SecondPassOptions.dtype": "`auto`: bfloat16 on a GPU, float32 on the CPU",
}

# What each output column means; the names and types come from schema.py.
COLUMN_NOTES = {
    "id": "the row's key: the manifest's `id`, else a digest of (`audio`, `task`, `target_language`, `keywords`)",
    "audio": "the input URI (relative manifest paths resolved against the manifest's folder)",
    "language": "the recording's language; the hive partition (`language=<lang>/`), not stored inside the files",
    "task": "`asr` or `ast`",
    "target_language": "the translation's language; null for `asr`",
    "text": "the whole transcript or translation; null on error",
    "segments": "one entry per speech segment, in time order (below)",
    "language_detected": "the identified language with `language: auto` or `detect_language: true`; else null",
    "duration_s": "length of the decoded recording, seconds",
    "error": "why the row failed, `<reason>: <detail>`; null on success",
    "model": "model id or path that made the row (with several models, the one it was routed to)",
    "model_revision": "that model's revision, where one was given or resolved",
    "run_id": "the run that wrote the row",
    "start": "seconds from the start of the recording",
    "end": "seconds from the start of the recording",
    "truncated": "decoding stopped at the segment's token budget instead of at the end of its text",
    "avg_logprob": "mean log-probability of the segment's chosen tokens (scaled logits); null where none was computed",
    "speaker": "speaker label `<session>:<N>` (granite-speech-4.1-2b-plus with `speakers: true`; models.md); else null",
    "words": "with `word_timestamps`: the segment's words (below); else null",
    "channel": "the channel (0, 1, ...) with `channels: split`; else null",
    "confidence": "mean CTC probability of the word's aligned letters; null where none was aligned",
    "name": "the second pass's dataset name",
    "output": "the language model's answer; null on error",
    "chunked": "the transcript was too long for one prompt and was processed in chunks, then combined",
}
WORD_NOTES = {"text": "the word as written in the segment's text"}
SEGMENT_NOTES = {
    "text": "the segment's transcript or translation",
    "model": "the model that made the segment: with a cascade, the model it was escalated to (rows can mix models)",
    "quality": "flags a reviewer can filter on, from the segment's own decoding (below)",
    "avg_logprob": "the segment's confidence: mean log-probability of its chosen tokens (scaled logits), for a CTC "
    "model of the labels its frames emit; null where none was computed",
}
QUALITY_NOTES = {
    "low_confidence": "`avg_logprob` below -0.6 (a geometric-mean token probability of about 0.55); null without one",
    "repetition": "the text loops: an n-gram of up to 12 words (characters in ja/zh) three times back to back over "
    "6+ words (12+ characters), or a zlib compression ratio over 2.4 (Whisper's test)",
    "chars_per_s": "characters (spaces left out) per second of the segment; null for an empty span",
    "rate": "`chars_per_s` outside its language's range (1.5-28; ja 0.5-14; zh 0.5-12) on a segment of 1 s or more "
    "with text: text invented beyond the audio, or speech dropped",
    "speech_ratio": "share of the segment's CTC frames outside pauses (blank runs of 0.3 s or more): CTC models, "
    "and LLM models with word times on (their encoder's CTC head); else null",
    "language_mismatch": "the row's language identified from its transcript is not its manifest language "
    "(`detect_language`); null where not identified",
    "escalated_from": "the model whose segment this one replaced in a cascade; null when not escalated",
    "escalated_for": "why it was sent on: `confidence` (below `escalate_below`) and the `escalate_on` flags it "
    "raised; set without `escalated_from` when the next model failed on it and the first model's text was kept",
}

# Flags whose argparse help is empty, by dest.
FLAG_NOTES = {
    "device": "where the model runs; `auto`: CUDA when the actor has a GPU, else CPU",
    "dtype": "`auto`: bfloat16 on a GPU, float32 on the CPU",
    "verbose": "debug logging",
    "directory": "folder to write the checkpoint to",
    "seed": "random seed of the weights (default 0)",
}

EXIT_NOTES = {
    "EXIT_OK": "the job ran to the end, whatever rows failed (failed rows are rows with `error` set)",
    "EXIT_RUNTIME": "also: another run holds the output (`--no-wait`, or the wait ran out), or it took the "
    "output over from this run",
    "EXIT_TOO_MANY_FAILURES": "the summary is still written",
}

PYTHON_API = {
    "granite_batch.run.processor": ["build_processor", "Processor.__call__"],
    "granite_batch.results": ["load", "to_pandas", "to_ray", "runs", "second_pass_results"],
    "granite_batch.evaluate": ["score_table", "score_rows", "format_report", "normalise", "asr_metric"],
    "granite_batch.run.transcription": ["run_job", "transcribe_files"],
    "granite_batch.config": ["load_config"],
}


def _missing(what: str) -> str:
    log.warning("docs reference: %s has no description (add one in the code or in docs/hooks/reference.py)", what)
    return ""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if isinstance(annotation, type):
        if annotation.__module__ == "granite_batch.config":
            return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _constraints(field) -> str:
    parts = []
    for item in field.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value:g}" if isinstance(value, float) else f"{symbol} {value}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if hasattr(value, "model_dump"):
        return "see below"
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _model_table(model: type, heading: str) -> str:
    lines = [
        f"### {heading}",
        "",
        (inspect.getdoc(model) or "").split("\n\n")[0],
        "",
        "| field | type | default | constraint | what |",
        "|---|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        key = f"{model.__name__}.{name}"
        what = field.description or CONFIG_NOTES.get(key) or _missing(f"config field {key}")
        lines.append(
            f"| `{name}` | {_type_name(field.annotation)} | {_cell(_default(field))} | {_cell(_constraints(field))} "
            f"| {_cell(what)} |"
        )
    return "\n".join(lines)


def config_reference() -> str:
    models = [
        (config.JobConfig, "JobConfig"),
        (config.GenerationOptions, "GenerationOptions"),
        (config.Resources, "Resources"),
        (config.ModelSpec, "ModelSpec"),
        (config.SecondPassOptions, "SecondPassOptions"),
    ]
    example = config.JobConfig(manifest="samples/manifest.jsonl", output="out/").model_dump(mode="json")
    sections = [_model_table(model, heading) for model, heading in models]
    yaml_text = yaml.safe_dump(example, sort_keys=False, allow_unicode=True)
    return (
        "Every field with its default, as `--config` reads it (a manifest and an output filled in):\n\n"
        f"```yaml\n{yaml_text}```\n\n" + "\n\n".join(sections)
    )


def _flag_value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if action.metavar:
        return f"`{action.metavar}`"
    kind = getattr(action.type, "__name__", "string")
    return {"int": "integer", "float": "number", "str": "string"}.get(kind, kind)


def _flag_rows(name: str, actions: list[argparse.Action]) -> list[str]:
    out = ["| flag | value | what |", "|---|---|---|"]
    for action in actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}` (positional)"
        what = action.help or FLAG_NOTES.get(action.dest) or _missing(f"flag {name} {flag}")
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in what:
            what += f" (default {action.default})"
        if action.option_strings and isinstance(action, argparse._AppendAction) and "repeat" not in what:
            what += "; repeatable"
        out.append(f"| {flag} | {_flag_value(action)} | {_cell(what)} |")
    return out + [""]


def _command(name: str, sub: argparse.ArgumentParser, help_text: str | None) -> list[str]:
    nested = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
    if nested is not None:  # a command with commands of its own (`config show`, `config schema`)
        helps = {choice.dest: choice.help for choice in nested._choices_actions}
        out = []
        for inner, parser in nested.choices.items():
            out += _command(f"{name} {inner}", parser, helps.get(inner))
        return out
    out = [f"## `granite-batch {name}`", "", help_text or _missing(f"command {name}"), ""]
    out += ["```text", sub.format_usage().strip(), "```", ""]
    groups = [group for group in sub._action_groups if group._group_actions]
    if len(groups) <= 2:  # argparse's own two: positional arguments and options
        return out + _flag_rows(name, [a for a in sub._actions])
    for group in groups:  # `run`'s flags by topic, as its --help shows them
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if actions:
            out += [f"**{group.title}**" + (f": {group.description}" if group.description else ""), ""]
            out += _flag_rows(name, actions)
    return out


def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines at the terminal's width
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    out = []
    for name, sub in commands.choices.items():
        out += _command(name, sub, helps.get(name))
    return "\n".join(out)


def _fields_table(fields, notes: dict) -> str:
    lines = ["| column | Arrow type | nullable | what |", "|---|---|---|---|"]
    for field in fields:
        what = notes.get(field.name) or COLUMN_NOTES.get(field.name) or _missing(f"column {field.name}")
        kind = str(field.type)
        kind = re.sub(r"struct<.*>", "struct<...>", kind) if len(kind) > 60 else kind  # nested fields: below
        lines.append(f"| `{field.name}` | `{kind}` | {'yes' if field.nullable else 'no'} | {_cell(what)} |")
    return "\n".join(lines)


def schema_transcripts() -> str:
    return _fields_table(schema.TRANSCRIPT_FIELDS, {})


def schema_segment() -> str:
    return _fields_table(list(schema.SEGMENT_TYPE), SEGMENT_NOTES)


def schema_quality() -> str:
    return _fields_table(list(schema.QUALITY_TYPE), QUALITY_NOTES)


def schema_word() -> str:
    return _fields_table(list(schema.WORD_TYPE), WORD_NOTES)


def schema_second_pass() -> str:
    return _fields_table(schema.SECOND_PASS_FIELDS, {})


def schema_folders() -> str:
    folders = [
        (f"{schema.TRANSCRIPTS_DIR}/language=<lang>/part-<run_id>-<n>.parquet", "committed transcript files"),
        (f"{schema.RUNS_DIR}/<run_id>.json", "one summary per run"),
        (f"{schema.STAGING_DIR}/<run_id>/", "files being written and the run's plan; moved or removed when it ends"),
        ("_leases/<dataset>/", "the lease records that keep one run at a time on a dataset"),
        ("subtitles/<format>/<id>.<format>", "with `subtitles: [srt, vtt]`"),
        (f"{schema.second_pass_dir('<name>')}/language=<lang>/part-<run_id>-<n>.parquet", "a second pass's rows"),
        (f"{schema.second_pass_dir('<name>')}/_runs/<run_id>.json", "a second pass's run summaries"),
        (f"{schema.EVAL_DIR}/<run_id>.json", "`granite-batch eval` reports"),
    ]
    return "```text\nOUTPUT/\n" + "\n".join(f"  {path:<64} {what}" for path, what in folders) + "\n```"


def exit_codes() -> str:
    source = inspect.getsource(cli.common)
    lines = ["| code | name | meaning |", "|---|---|---|"]
    for name, value, comment in re.findall(r"^(EXIT_\w+) = (\d+)(?:\s*#\s*(.*))?$", source, re.MULTILINE):
        meaning = "; ".join(part for part in (comment, EXIT_NOTES.get(name)) if part) or _missing(f"exit {name}")
        lines.append(f"| {value} | `cli.{name}` | {_cell(meaning)} |")
    return "\n".join(lines)


def python_api() -> str:
    import importlib

    out = []
    for module_name, names in PYTHON_API.items():
        module = importlib.import_module(module_name)
        out += [f"## `{module_name}`", "", (inspect.getdoc(module) or "").split("\n\n")[0], ""]
        for name in names:
            function = module
            for part in name.split("."):  # a method: `Class.method`
                function = getattr(function, part)
            signature = str(inspect.signature(function)).replace("'", "")
            doc = inspect.getdoc(function) or _missing(f"{module_name}.{name}")
            out += [f"### `{name}`", "", f"```python\n{name}{signature}\n```", "", doc, ""]
    return "\n".join(out)


GENERATORS = {
    "config": config_reference,
    "cli": cli_reference,
    "schema-folders": schema_folders,
    "schema-transcripts": schema_transcripts,
    "schema-segment": schema_segment,
    "schema-word": schema_word,
    "schema-second-pass": schema_second_pass,
    "exit-codes": exit_codes,
    "python-api": python_api,
    "schema-quality": schema_quality,
}


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    def generate(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            log.warning("%s: no generator named %r", page.file.src_uri, name)
            return match.group(0)
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files: Files, config, **kwargs) -> Files:
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(
            File(
                f"notebooks/{notebook.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
