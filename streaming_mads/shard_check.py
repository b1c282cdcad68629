"""Shard files checked against the sizes and hashes their ``index.json`` records.

``mads convert`` records an ``xxh3_64`` hash of every shard file in ``index.json``. Streaming
checks a hash (``validate_hash``) only on what it downloads, never on a shard already in the local
folder, so a modified or damaged local shard would be trained on. This module is the one check of
shard bytes against the index: ``mads label`` checks each shard it reads
(:func:`check_shard_bytes`), and ``mads verify`` and ``MADSDataset(verify_shards=True)`` check
every local shard file (:func:`verify_streams`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable, Optional, Sequence

from streaming_mads.remote import contained_path

__all__ = ['SHARD_FILE_KEYS', 'ShardCheckError', 'ShardProblem', 'VerifyReport', 'recorded_hash',
           'check_shard_bytes', 'verify_streams']

#: The keys of a shard's entry in ``index.json`` that name its files (MDS: data; JSON, CSV: also
#: meta), raw and compressed.
SHARD_FILE_KEYS = ('raw_data', 'zip_data', 'raw_meta', 'zip_meta')
#: Hash algorithms tried first when an index records several (the fastest to compute).
_FAST_FIRST = ('xxh3_64', 'xxh3_128', 'xxh128', 'xxh64', 'xxh32')
_CHUNK = 8 << 20


class ShardCheckError(ValueError):
    """Shard files do not match their ``index.json``; the message names each and the fix."""


def _hasher(algo: str) -> Callable[..., Any]:
    """Streaming's hash ``algo`` (xxhash's or hashlib's), to feed in chunks."""
    import xxhash
    if algo in xxhash.algorithms_available:
        return getattr(xxhash, algo)
    return lambda data=b'': hashlib.new(algo, data)


def recorded_hash(info: Any) -> Optional[tuple[str, str]]:
    """The ``(algorithm, hex digest)`` to check a shard file by, or ``None`` if none is recorded.

    Args:
        info (Any): The file's entry in ``index.json`` (``raw_data``, ``zip_data``, ...).

    Returns:
        tuple[str, str], optional: Of the recorded hashes Streaming can compute, the fastest.
    """
    from streaming.base.hashing import is_hash
    hashes = info.get('hashes') if isinstance(info, dict) else None
    usable = {algo: digest for algo, digest in (hashes or {}).items()
              if isinstance(algo, str) and isinstance(digest, str) and is_hash(algo)}
    if not usable:
        return None
    algo = next((a for a in _FAST_FIRST if a in usable), min(usable))
    return algo, usable[algo]


def _mismatch(path: str, stream: str, algo: str) -> str:
    return (f'Shard {path} of stream {stream} does not match the {algo} hash in its index.json: '
            'the shard was modified or corrupted; re-convert or re-download the stream.')


def check_shard_bytes(data: bytes, info: Any, path: str, stream: str,
                      error: type[Exception] = ShardCheckError) -> None:
    """Compare a shard file's bytes with the hash its index records (no hash: nothing to check).

    Args:
        data (bytes): The file's content.
        info (Any): The file's entry in ``index.json``.
        path (str): The file, for the error.
        stream (str): The stream's name, for the error.
        error (type[Exception]): The exception to raise. Defaults to :class:`ShardCheckError`.
    """
    recorded = recorded_hash(info)
    if recorded is not None and _hasher(recorded[0])(data).hexdigest() != recorded[1]:
        raise error(_mismatch(path, stream, recorded[0]))


@dataclass(frozen=True)
class ShardProblem:
    """A local shard file that is not the one its index describes."""
    stream: str
    basename: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f'stream {self.stream}: {self.basename}: {self.reason}'


@dataclass
class VerifyReport:
    """What :func:`verify_streams` checked and found.

    Attributes:
        streams (int): Streams looked at.
        files (int): Local shard files checked (size, and hash where recorded).
        bytes (int): Their total size.
        absent (int): Shards of which no file is in the local folders (not downloaded yet).
        unhashed (list[tuple[str, str]]): ``(stream, basename)`` of local files whose index entry
            records no hash Streaming knows (only their size was checked).
        bad (list[ShardProblem]): Files whose size or hash differs from the index.
        seconds (float): Time taken.
    """
    streams: int = 0
    files: int = 0
    bytes: int = 0
    absent: int = 0
    unhashed: list[tuple[str, str]] = field(default_factory=list)
    bad: list[ShardProblem] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: what was checked, how fast, and what was found."""
        rate = self.bytes / 1e6 / self.seconds if self.seconds > 0 else float('inf')
        return (f'{self.files} local shard file(s) of {self.streams} stream(s), '
                f'{self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s): '
                f'{len(self.bad)} bad, {len(self.unhashed)} without a hash; {self.absent} '
                'shard(s) not local')

    def problems(self) -> str:
        """Every bad file, one a line."""
        return '\n'.join(str(p) for p in self.bad)

    def unhashed_note(self) -> str:
        """Why files without a hash could not be checked, naming their streams."""
        streams = sorted({s for s, _ in self.unhashed})
        return (f'{len(self.unhashed)} local shard file(s) of stream(s) {", ".join(streams)} have '
                'no hash in their index.json, so only their size was checked: write the streams '
                'with `mads convert` (it records xxh3_64 by default) to have them verified.')


def _check_file(path: str, info: dict[str, Any], stream: str, basename: str,
                report: VerifyReport) -> None:
    size = os.path.getsize(path)
    report.files += 1
    report.bytes += size
    if size != info.get('bytes'):
        report.bad.append(ShardProblem(stream, basename, path, f'has {size} bytes, its '
                                       f'index.json says {info.get("bytes")}'))
        return
    recorded = recorded_hash(info)
    if recorded is None:
        report.unhashed.append((stream, basename))
        return
    digest = _hasher(recorded[0])()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    if digest.hexdigest() != recorded[1]:
        report.bad.append(ShardProblem(stream, basename, path,
                                       f'does not match the {recorded[0]} hash in its index.json'))


def verify_streams(streams: Sequence[tuple[str, str]],
                   part: tuple[int, int] = (0, 1)) -> VerifyReport:
    """Check every local shard file of ``streams`` against its ``index.json``.

    Each file present in a stream's folder (raw or compressed) must have the size its index
    records and, where the index records a hash, that hash. Files not present (a remote stream's
    cache before download) are counted, not fetched: Streaming checks what it downloads when
    given ``validate_hash``.

    Args:
        streams (Sequence[tuple[str, str]]): ``(name, folder holding index.json)`` of each stream.
        part (tuple[int, int]): ``(k, n)``: check only the ``k``-th of every ``n`` shards (over
            all streams), so ``n`` processes sharing the folders check each shard once.
            Defaults to ``(0, 1)``, every shard.

    Returns:
        VerifyReport: What was checked and every file that is not what its index describes.

    Raises:
        ShardCheckError: An index that cannot be read, or names a file outside its folder.
    """
    begin = perf_counter()
    report = VerifyReport(streams=len(streams))
    k, n = part
    position = 0
    for name, split_dir in streams:
        index_path = os.path.join(split_dir, 'index.json')
        try:
            with open(index_path, encoding='utf-8') as f:
                index = json.load(f)
            shards = index['shards']
            if not isinstance(shards, list):
                raise TypeError('`shards` is not a list')
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ShardCheckError(f'Cannot read the index of stream {name} ({index_path}): '
                                  f'{err}.') from err
        source = f'a shard file name in {index_path}'
        for shard in shards:
            position += 1
            if (position - 1) % n != k:
                continue
            present = False
            for key in SHARD_FILE_KEYS:
                info = shard.get(key) if isinstance(shard, dict) else None
                if not info:
                    continue
                if not isinstance(info, dict):
                    raise ShardCheckError(f'{index_path} has a malformed {key} entry: {info!r}.')
                basename = info.get('basename')
                path = contained_path(split_dir, basename, source, ShardCheckError)
                if os.path.isfile(path):
                    present = True
                    _check_file(path, info, name, basename, report)
            report.absent += not present
    report.seconds = perf_counter() - begin
    return report
