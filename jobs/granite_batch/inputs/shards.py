"""Tar shards of recordings (WebDataset's layout), read as manifest rows while they stream by.

A shard holds samples as consecutive members sharing a key, the member's name up to the first dot
of its file name: `calls/0001.flac` and `calls/0001.json` are sample `calls/0001`, with the
extensions `flac` and `json` (WebDataset's convention: "any text after the first '.' in the filename
is used as a key/extension", as torchdata's WebDataset reader documents it,
https://pytorch.org/data/0.8/generated/torchdata.datapipes.iter.WebDataset.html).
Each audio member becomes a row with its bytes; the sample's `.json` sidecar, when it has one,
gives the row's columns (`id`, `language`, `reference`, anything else). The shard is read once,
front to back, in tarfile's stream mode over the fsspec file: only the current sample is held,
however large the shard, and object stores are read sequentially.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator

TAR_SUFFIXES = (".tar",)


class ShardError(ValueError):
    """The shard cannot be read as samples; the message names the shard and the member."""


def is_shard(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in TAR_SUFFIXES


def member_uri(shard_uri: str, member: str) -> str:
    """The source name of a shard's member, as fsspec spells one file inside a tar (`tar://...::`)."""
    return f"tar://{member}::{shard_uri}"


def _key_and_extension(name: str) -> tuple[str, str]:
    folder, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension.lower() if dot else ""


def iter_samples(
    fs, path: str, audio_suffixes: tuple[str, ...], name: str | None = None
) -> Iterator[tuple[str, bytes, dict]]:
    """(member name, audio bytes, sidecar columns) for each audio member of the shard at `path`, in
    shard order. Members that are neither audio (by `audio_suffixes`) nor a `.json` sidecar are
    skipped. Raises ShardError for a shard that is not a tar file, or a sidecar that is not a JSON
    object."""
    name = name or path
    key: str | None = None
    audio: list[tuple[str, bytes]] = []
    sidecar: dict = {}

    def sample() -> Iterator[tuple[str, bytes, dict]]:
        for member, data in audio:
            yield member, data, sidecar

    with fs.open(path, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, extension = _key_and_extension(member.name)
                    is_audio = ("." + extension.rsplit(".", 1)[-1]) in audio_suffixes
                    if not is_audio and extension != "json":
                        continue
                    if member_key != key:
                        yield from sample()
                        key, audio, sidecar = member_key, [], {}
                    data = tar.extractfile(member).read()
                    if is_audio:
                        audio.append((member.name, data))
                        continue
                    try:
                        sidecar = json.loads(data)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise ShardError(f"{name}: member {member.name}: malformed JSON ({exc})") from None
                    if not isinstance(sidecar, dict):
                        raise ShardError(f"{name}: member {member.name}: a sidecar must be a JSON object")
        except tarfile.TarError as exc:
            raise ShardError(f"{name}: not a readable tar shard ({exc})") from None
    yield from sample()
