"""One way to reach every URI the job touches: local paths, file://, s3://, gs://, any fsspec scheme.

Options are kept per scheme (`storage_options: {s3: {...}, gs: {...}}`), so one job can read
recordings from a bucket and write to local disk with the right options for each. Credentials are
never options here: they come from the standard chains (environment, profiles, instance roles).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import cached_property
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


# Percent-encodings that would change a path's segments or decode again on a server that decodes
# twice: `/`, `\`, and control characters (`%25`, a literal `%`, is fine unless what it decodes to
# is itself an encoding). A URL that carries one cannot be given one
# canonical form, so under an allow-list it is refused.
_UNSAFE_ENCODED = re.compile(r"%(2f|5c|[01][0-9a-f]|7f)", re.IGNORECASE)
_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# What stays unquoted in a canonical path: RFC 3986's unreserved characters and a segment's
# sub-delimiters, as yarl (aiohttp's URL type) leaves them.
_PATH_SAFE = "/-._~!$&'()*+,;=:@"


class NotCanonical(ValueError):
    """An http(s) URL that cannot be given one canonical form (str() says why)."""


def canonical_url(url: str) -> str:
    """`url` as the one URL the job checks and then fetches: scheme and host lower-cased, the
    default port dropped, the path percent-decoded, its `.`/`..` segments and doubled slashes
    resolved (as aiohttp's yarl and most servers resolve them, `%2e%2e` included), then quoted
    again; the query kept, the fragment dropped. Raises NotCanonical for what has no single
    reading: encoded slashes or backslashes, backslashes, control characters, double encoding,
    `..;` segments, bytes that are not UTF-8, user information, a bad port or no host."""
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in url):
        raise NotCanonical(f"{url!r} holds a backslash or a control character")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise NotCanonical(f"{url!r}: {exc}") from None
    if "@" in parts.netloc:  # parsers disagree on `a@b@c`; credentials have no place in a manifest
        raise NotCanonical(f"{url!r} carries user information")
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in HTTP_PROTOCOLS or not host:
        raise NotCanonical(f"{url!r} is not an http(s) URL with a host")
    if _UNSAFE_ENCODED.search(parts.path):
        raise NotCanonical(f"{url!r} percent-encodes a slash, a backslash or a control character")
    try:
        path = urllib.parse.unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise NotCanonical(f"{url!r} percent-encodes bytes that are not UTF-8") from None
    if _PERCENT.search(path):
        raise NotCanonical(f"{url!r} is percent-encoded twice")
    if any(segment.split(";", 1)[0] in (".", "..") and ";" in segment for segment in path.split("/")):
        raise NotCanonical(f"{url!r} has a dot segment with parameters (`..;`)")
    path = "/" + posixpath.normpath("/" + path).lstrip("/")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return urllib.parse.urlunsplit((scheme, netloc, urllib.parse.quote(path, safe=_PATH_SAFE), parts.query, ""))


def _canonical(uri: str) -> str:
    """A URI with `..`, symlinks (local files) and scheme aliases resolved, for prefix checks
    (http(s): `canonical_url`'s host, port and decoded path; raises NotCanonical)."""
    protocol = protocol_of(uri)
    if protocol in LOCAL_PROTOCOLS:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return os.path.realpath(path)
    path = uri.split("://", 1)[1] if "://" in uri else uri
    if protocol in HTTP_PROTOCOLS:  # the query is not a folder
        parts = urllib.parse.urlsplit(canonical_url(uri))
        return f"{protocol}://{parts.netloc}{urllib.parse.unquote(parts.path)}"
    return f"{protocol}://{posixpath.normpath('/' + path).lstrip('/')}"


def is_allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `uri` lies under one of `prefixes` (whole path components; no prefixes allows all).
    For http(s) a prefix names a host and a path prefix (`https://media.example.org/podcasts/`),
    and the URL is compared in the form it is fetched in (`canonical_url`); one without a canonical
    form is outside. A blank prefix allows nothing, so a list of blanks (an empty template
    variable) refuses every URI instead of allowing them all."""
    if not prefixes:
        return True
    try:
        target = _canonical(uri)
    except NotCanonical:
        return False
    for prefix in prefixes:
        if not prefix.strip():
            continue
        try:
            base = _canonical(prefix.strip()).rstrip("/")
        except NotCanonical:
            continue
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


def _checked(url: str, allowed_prefixes: tuple[str, ...], came_from: str | None = None) -> str:
    """`url` in its canonical form, the one the job then asks for; raises NotAllowed when it has
    none or lies outside `allowed_prefixes` (`came_from`: the URL that redirected to it)."""
    what = f"{came_from} redirects to {url}," if came_from else f"{url} is"
    try:
        canonical = canonical_url(url)
    except NotCanonical as exc:
        raise NotAllowed(f"{what} not checkable against the allowed prefixes ({exc})") from None
    if not is_allowed(canonical, allowed_prefixes):
        raise NotAllowed(f"{what} outside the allowed prefixes")
    return canonical


def probe_url(url: str, allowed_prefixes: tuple[str, ...] = (), timeout_s: float = 30.0) -> tuple[str, int | None]:
    """(the URL `url` leads to after its redirects, its Content-Length or None), by HEAD requests;
    with `allowed_prefixes`, `url` and each redirect's target are checked in their canonical form
    (`canonical_url`), and that form is what is asked for and returned (a server that
    refuses HEAD is taken at its word). Raises NotAllowed for a target outside them,
    FileNotFoundError (404, 410), PermissionError (401, 403), OSError otherwise (dropped
    connections, timeouts, other statuses: `status` holds the HTTP status when there is one)."""
    opener = urllib.request.build_opener(_NoRedirect())
    if allowed_prefixes:
        url = _checked(url, allowed_prefixes)
    for _ in range(HTTP_MAX_REDIRECTS + 1):
        request = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
        try:
            with opener.open(request, timeout=timeout_s) as response:
                length = response.headers.get("Content-Length")
                return url, int(length) if length and length.isdigit() else None
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                target = urllib.parse.urljoin(url, exc.headers["Location"])
                url = _checked(target, allowed_prefixes, came_from=url) if allowed_prefixes else target
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


@dataclass(frozen=True)
class OutputRoot:
    """A job's output folder (`uri`, reached with `storage_options`): the one place its filesystem
    is made. A command makes one at its start and hands it to everything that reads or writes
    under the output (transcripts, summaries, leases, plans, subtitles); the filesystem is made
    once, on first use, and is not pickled (a Ray task that gets the root makes its own)."""

    uri: str
    storage_options: dict[str, dict[str, Any]] | None = None

    @cached_property
    def fs_and_path(self) -> tuple[Any, str]:
        """(filesystem, the root's path within it), made once."""
        return filesystem(self.uri, self.storage_options)

    @property
    def fs(self):
        return self.fs_and_path[0]

    @property
    def path(self) -> str:
        """The root's path within `fs`."""
        return self.fs_and_path[1]

    @property
    def local(self) -> bool:
        """Whether the root is on a local (or POSIX-mounted) filesystem."""
        return protocol_of(self.uri) in LOCAL_PROTOCOLS

    def join(self, *parts: str) -> str:
        """A path within `fs` under the root."""
        return posixpath.join(self.path, *parts)

    def uri_of(self, path: str) -> str:
        """A path within `fs` written back as a URI (plain path for local files)."""
        return uri_of(self.fs, path)

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options}


def write_json(root: OutputRoot, relative_path: str, document: dict) -> str:
    """Write `document` as indented JSON to `relative_path` under `root`; return its URI.

    The one writer of the job's JSON files: run summaries, second-pass summaries, eval reports.
    Raises ValueError for a `relative_path` that is absolute or leaves `root` (`..`), such as
    one built from a path-like filter value.
    """
    parts = relative_path.replace("\\", "/").split("/")
    if relative_path.startswith(("/", "\\")) or ".." in parts or "" in parts:
        raise ValueError(f"refusing to write {relative_path!r}: it would not lie inside {root.uri}")
    path = root.join(relative_path)
    root.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with root.fs.open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")
    return root.uri_of(path)
