"""One way to reach every URI the job touches: local paths, file://, s3://, gs://, any fsspec scheme.

Options are kept per scheme (`storage_options: {s3: {...}, gs: {...}}`), so one job can read
recordings from a bucket and write to local disk with the right options for each. Credentials are
never options here: they come from the standard chains (environment, profiles, instance roles).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
from fsspec.core import split_protocol

# Retries for transient errors (HTTP 500/503, SlowDown, resets, timeouts): botocore's standard mode
# backs off exponentially with jitter; s3fs retries what it knows to be transient on top (5 times).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {
        "config_kwargs": {
            "retries": {"max_attempts": 10, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        },
    },
}
LOCAL_PROTOCOLS = ("file", "local")


def protocol_of(uri: str) -> str:
    protocol, _ = split_protocol(uri)
    return {"s3a": "s3", "gcs": "gs"}.get(protocol or "file", protocol or "file")


def options_for(uri: str, storage_options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The fsspec options for `uri`'s scheme: our defaults, then the job's."""
    protocol = protocol_of(uri)
    options = {key: (dict(value) if isinstance(value, dict) else value)
               for key, value in _DEFAULTS.get(protocol, {}).items()}
    for key, value in ((storage_options or {}).get(protocol) or {}).items():
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return options


def filesystem(uri: str, storage_options: dict[str, dict[str, Any]] | None = None):
    """(filesystem, path within it) for `uri`."""
    return fsspec.core.url_to_fs(uri, **options_for(uri, storage_options))


def uri_of(fs, path: str) -> str:
    """A path inside `fs` written back as a URI (plain path for local files)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in LOCAL_PROTOCOLS else f"{protocol}://{path}"


def write_json(root_uri: str, relative_path: str, document: dict,
               storage_options: dict[str, dict[str, Any]] | None = None) -> str:
    """Write `document` as indented JSON to `relative_path` under `root_uri`; return its URI.

    The one writer of the job's JSON files: run summaries, second-pass summaries, eval reports.
    """
    fs, root = filesystem(root_uri, storage_options)
    path = posixpath.join(root, relative_path)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")
    return uri_of(fs, path)
