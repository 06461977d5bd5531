"""`granite-batch config show | schema`: the effective job config as YAML, and its JSON schema."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from granite_batch.cli.common import EXIT_OK, exit_code
from granite_batch.cli.run import job_arguments, job_config

# Storage options are documented as holding no secrets; a value under a name like these is masked anyway.
SECRET_NAME = re.compile(r"secret|password|token|credential|(^|_)key$", re.IGNORECASE)


def register(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="print the effective job config (YAML) or its JSON schema")
    actions = config.add_subparsers(dest="action", required=True, metavar="{show,schema}")
    show = actions.add_parser(
        "show",
        help="the config `run` would use with the same --config, GRANITE_BATCH_* variables, flags and --set, "
        "as YAML that --config reads back",
    )
    job_arguments(show)
    show.set_defaults(handler=_cmd_show)
    schema = actions.add_parser("schema", help="the JSON schema of the job config (for editors and validators)")
    schema.set_defaults(handler=_cmd_schema)


def _masked(value: Any, name: str = "") -> Any:
    if isinstance(value, dict):
        return {key: _masked(inner, str(key)) for key, inner in value.items()}
    return "***" if value is not None and SECRET_NAME.search(name) else value


def _cmd_show(args: argparse.Namespace) -> int:
    import yaml

    try:
        config = job_config(args)
    except Exception as exc:  # exit codes: cli/common.py
        return exit_code(exc, "config show")
    data = config.model_dump(mode="json")
    data["storage_options"] = _masked(data["storage_options"])
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from granite_batch.config import JobConfig

    print(json.dumps(JobConfig.model_json_schema(), indent=2))
    return EXIT_OK
