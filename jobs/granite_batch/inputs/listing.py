"""Recordings found by listing a prefix or a glob instead of reading a manifest."""

from __future__ import annotations

import posixpath
import re

from granite_batch.inputs.shards import TAR_SUFFIXES, is_shard

AUDIO_SUFFIXES = (
    ".wav",
    ".flac",
    ".mp3",
    ".ogg",
    ".opus",
    ".oga",
    ".m4a",
    ".aac",
    ".mp4",
    ".m4v",
    ".mkv",
    ".webm",
    ".mov",
    ".wma",
    ".aif",
    ".aiff",
    ".amr",
    ".3gp",
)


_GLOB_CHARS = "*?[{"


def _glob_regex(pattern: str) -> re.Pattern:
    """`**` any depth, `*`/`?` within one folder, `{language}` one folder name captured as the language."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("{language}", i):
            out.append(r"(?P<language>[^/]+)")
            i += len("{language}")
        elif pattern.startswith("**/", i):
            out.append(r"(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _iter_listing(fs, pattern: str, sizes: bool = False):
    """Yield (path, language or None) for each recording matching `pattern`, folder by folder;
    with `sizes`, (path, language, bytes)."""
    has_glob = any(ch in pattern for ch in _GLOB_CHARS)
    if not has_glob and is_shard(pattern) and fs.isfile(pattern):  # one shard, listed alone
        yield (pattern, None, fs.size(pattern)) if sizes else (pattern, None)
        return
    if not has_glob:
        pattern = pattern.rstrip("/") + "/**"
    root = pattern[: min((pattern.find(ch) for ch in _GLOB_CHARS if ch in pattern), default=len(pattern))]
    root = root.rsplit("/", 1)[0] if "/" in root else root
    matcher = _glob_regex(pattern)
    # fs.walk lists one folder at a time, so a prefix with millions of keys is never held whole.
    for folder, _, names in fs.walk(root, detail=sizes):
        for name in sorted(names):
            path = posixpath.join(folder, name)
            match = matcher.match(path)
            if match and (has_glob or posixpath.splitext(name)[1].lower() in AUDIO_SUFFIXES + TAR_SUFFIXES):
                language = match.groupdict().get("language")
                yield (path, language, names[name].get("size") or 0) if sizes else (path, language)
