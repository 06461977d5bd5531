"""Tar shards of recordings (WebDataset's layout), read as manifest rows while they stream by.

A shard holds samples as consecutive members sharing a key, the member's name up to the first dot
of its file name: `calls/0001.flac` and `calls/0001.json` are sample `calls/0001`, with the
extensions `flac` and `json` (WebDataset's convention: "any text after the first '.' in the filename
is used as a key/extension", as torchdata's WebDataset reader documents it,
https://pytorch.org/data/0.8/generated/torchdata.datapipes.iter.WebDataset.html).
Each audio member becomes a row with its bytes; the sample's `.json` sidecar, when it has one,
gives the row's columns (`id`, `language`, `reference`, anything else). The sidecar is found by key
anywhere in the shard, not only next to its audio, so `tar cf shard.tar *.wav *.json` works too. The shard is read once,
front to back, in tarfile's stream mode over the fsspec file: only the current sample is held when
sidecars lie next to their audio, however large the shard, and object stores are read sequentially.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

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


@dataclass
class ShardMember:
    """One audio member of a shard as a row: its bytes and its sample's sidecar columns, or (a
    link, a device) no bytes and the row's error."""

    name: str
    data: bytes
    sidecar: dict
    error: str | None = None


@dataclass
class ShardCounts:
    """What a shard held besides rows: members skipped (neither audio nor a sidecar, or a sidecar
    that is not a regular file) and sidecars whose key has no audio member."""

    skipped: Counter = field(default_factory=Counter)  # reason -> members

    def add(self, reason: str, name: str, shard: str) -> None:
        self.skipped[reason] += 1
        log.debug("%s: member %s skipped: %s", shard, name, reason)


# Audio held while its sidecar may still come later in the shard (`tar cf s.tar *.wav *.json`);
# past this, a member's bytes are read again from its offset when its sidecar is known.
HELD_BYTES = 256 * 2**20


def iter_samples(
    fs, path: str, audio_suffixes: tuple[str, ...], name: str | None = None, counts: ShardCounts | None = None
) -> Iterator[ShardMember]:
    """A ShardMember for each audio member of the shard at `path`. Sidecars are matched by key
    within the whole shard, wherever they lie: a sample whose sidecar is next to it (WebDataset's
    layout) comes at once; audio whose sidecar has not been seen yet waits for the end of the shard
    (held up to HELD_BYTES, then read again from its offset), so a shard made the ordinary way
    (`tar cf shard.tar *.wav *.json`) keeps every sidecar. An audio member that is a hard or
    symbolic link (or a device) gives a row with an error; other members that are neither audio
    (by `audio_suffixes`) nor a `.json` sidecar, and sidecars without audio, are counted in
    `counts`. Raises ShardError for a shard that is not a tar file, or a sidecar that is not a
    JSON object."""
    name = name or path
    counts = counts if counts is not None else ShardCounts()
    sidecars: dict[str, dict] = {}  # every sidecar of the shard, by key (small: JSON objects)
    used: set[str] = set()  # keys whose sidecar an audio member took
    current: list[_Audio] = []  # the audio members of the sample being read
    waiting: list[_Audio] = []  # audio members whose sidecar may come later
    held = 0

    def settle() -> Iterator[ShardMember]:
        """The sample just read: out now if its sidecar is known, else it waits."""
        nonlocal held
        for audio in current:
            if audio.key in sidecars:
                used.add(audio.key)
                yield audio.row(sidecars[audio.key])
                continue
            if audio.data is not None and held + len(audio.data) > HELD_BYTES:
                audio.data = None  # read again from its offset at the end
            held += len(audio.data or b"")
            waiting.append(audio)
        current.clear()

    with fs.open(path, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    key, extension = _key_and_extension(member.name)
                    is_audio = ("." + extension.rsplit(".", 1)[-1]) in audio_suffixes
                    if not is_audio and extension != "json":
                        counts.add("neither audio nor a .json sidecar", member.name, name)
                        continue
                    if current and current[0].key != key:
                        yield from settle()
                    if not member.isfile():
                        kind = _link_kind(member)
                        if not is_audio:
                            counts.add(f"a sidecar that is {kind.split(' to ')[0]}", member.name, name)
                            continue
                        error = (
                            f"not a regular file: shard member {member.name} is {kind} "
                            "(store the recording itself in the shard)"
                        )
                        current.append(_Audio(key, member.name, b"", 0, 0, error))
                        continue
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if is_audio:
                        current.append(_Audio(key, member.name, data, member.offset_data, member.size))
                        continue
                    try:
                        sidecar = json.loads(data)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise ShardError(f"{name}: member {member.name}: malformed JSON ({exc})") from None
                    if not isinstance(sidecar, dict):
                        raise ShardError(f"{name}: member {member.name}: a sidecar must be a JSON object")
                    sidecars[key] = sidecar
                yield from settle()
        except tarfile.TarError as exc:
            raise ShardError(f"{name}: not a readable tar shard ({exc})") from None
    with contextlib.ExitStack() as stack:
        again = None  # the shard opened again, only to read what was not held
        for audio in waiting:
            if audio.data is None:
                again = again or stack.enter_context(fs.open(path, "rb"))
                again.seek(audio.offset)
                audio.data = again.read(audio.size)
            if audio.key in sidecars:
                used.add(audio.key)
            yield audio.row(sidecars.get(audio.key, {}))
    for key in sidecars.keys() - used:
        counts.add("a sidecar without audio", f"{key}.json", name)


@dataclass
class _Audio:
    key: str
    member: str
    data: bytes | None  # None: not held, read again from `offset`
    offset: int
    size: int
    error: str | None = None

    def row(self, sidecar: dict) -> ShardMember:
        return ShardMember(self.member, self.data or b"", sidecar, self.error)


def _link_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {member.linkname}"
    if member.islnk():
        return f"a hard link to {member.linkname}"
    return "a device, a fifo or another special file"
