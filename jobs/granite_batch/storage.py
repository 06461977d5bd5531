"""One way to reach every URI the job touches: local paths, file://, s3://, gs://, any fsspec scheme.

Options are kept per scheme (`storage_options: {s3: {...}, gs: {...}}`), so one job can read
recordings from a bucket and write to local disk with the right options for each. Credentials are
never options here: they come from the standard chains (environment, profiles, instance roles).
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.error
import urllib.parse
import urllib.request
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
HTTP_PROTOCOLS = ("http", "https")
HTTP_TIMEOUTS_S = {"sock_connect": 10, "sock_read": 60}  # per connection attempt, per read
HTTP_MAX_REDIRECTS = 5


class NotAllowed(Exception):
    """A URI (or a redirect's target) lies outside the job's allowed prefixes; str() says which."""


def _canonical(uri: str) -> str:
    """A URI with `..`, symlinks (local files) and scheme aliases resolved, for prefix checks."""
    protocol = protocol_of(uri)
    if protocol in LOCAL_PROTOCOLS:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return os.path.realpath(path)
    path = uri.split("://", 1)[1] if "://" in uri else uri
    if protocol in HTTP_PROTOCOLS:  # host names are case-insensitive; the query is not a folder
        parts = urllib.parse.urlsplit(uri)
        path = parts.netloc.lower() + (parts.path or "/")
    return f"{protocol}://{posixpath.normpath('/' + path).lstrip('/')}"


def is_allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `uri` lies under one of `prefixes` (whole path components; no prefixes allows all).
    For http(s) a prefix names a host and a path prefix (`https://media.example.org/podcasts/`)."""
    if not prefixes:
        return True
    target = _canonical(uri)
    for prefix in prefixes:
        base = _canonical(prefix).rstrip("/")
        if target == base or target.startswith(base + "/"):
            return True
    return False


def protocol_of(uri: str) -> str:
    protocol, _ = split_protocol(uri)
    return {"s3a": "s3", "gcs": "gs"}.get(protocol or "file", protocol or "file")


def options_for(uri: str, storage_options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The fsspec options for `uri`'s scheme: our defaults, then the job's."""
    protocol = protocol_of(uri)
    options = {
        key: (dict(value) if isinstance(value, dict) else value) for key, value in _DEFAULTS.get(protocol, {}).items()
    }
    for key, value in ((storage_options or {}).get(protocol) or {}).items():
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return options


def filesystem(uri: str, storage_options: dict[str, dict[str, Any]] | None = None):
    """(filesystem, path within it) for `uri`."""
    options = options_for(uri, storage_options)
    if protocol_of(uri) in HTTP_PROTOCOLS and "client_kwargs" not in options:
        import aiohttp  # fsspec's HTTP filesystem is aiohttp's; its default read timeout is 5 minutes

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, **HTTP_TIMEOUTS_S)}
    return fsspec.core.url_to_fs(uri, **options)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # each hop is checked by `probe_url` before it is followed


def probe_url(url: str, allowed_prefixes: tuple[str, ...] = (), timeout_s: float = 30.0) -> tuple[str, int | None]:
    """(the URL `url` leads to after its redirects, its Content-Length or None), by HEAD requests,
    each redirect's target checked against `allowed_prefixes` before it is followed (a server that
    refuses HEAD is taken at its word). Raises NotAllowed for a target outside them,
    FileNotFoundError (404, 410), PermissionError (401, 403), OSError otherwise (dropped
    connections, timeouts, other statuses: `status` holds the HTTP status when there is one)."""
    opener = urllib.request.build_opener(_NoRedirect())
    for _ in range(HTTP_MAX_REDIRECTS + 1):
        request = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
        try:
            with opener.open(request, timeout=timeout_s) as response:
                length = response.headers.get("Content-Length")
                return url, int(length) if length and length.isdigit() else None
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                target = urllib.parse.urljoin(url, exc.headers["Location"])
                if not is_allowed(target, allowed_prefixes):
                    raise NotAllowed(f"{url} redirects to {target}, outside the allowed prefixes") from None
                url = target
                continue
            if exc.code in (404, 410):
                raise FileNotFoundError(url) from None
            if exc.code in (401, 403):
                raise PermissionError(url) from None
            if exc.code in (405, 501):
                return url, None
            error = OSError(f"HTTP {exc.code} {exc.reason}")
            error.status = exc.code
            raise error from None
    raise OSError(f"more than {HTTP_MAX_REDIRECTS} redirects")


def uri_of(fs, path: str) -> str:
    """A path inside `fs` written back as a URI (plain path for local files)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in LOCAL_PROTOCOLS else f"{protocol}://{path}"


def write_json(
    root_uri: str, relative_path: str, document: dict, storage_options: dict[str, dict[str, Any]] | None = None
) -> str:
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
