"""Synthetic labelled MDS corpora for benchmarks (real MDSWriter shards, real sidecar labels)."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from streaming import MDSWriter

from streaming_mads import categorical, score, write_labels


def build_token_corpus(out: str, samples: int, seq_len: int, vocab: int = 50000,
                       seed: int = 0, size_limit: int = 1 << 24) -> str:
    """Random token samples with 7 domains, a 0-5 quality score and 13 topics."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    with MDSWriter(out=out, columns={'tokens': f'ndarray:{np.dtype(dtype).name}'},
                   compression='zstd', size_limit=size_limit) as writer:
        for _ in range(samples):
            writer.write({'tokens': rng.integers(0, vocab, seq_len, dtype=dtype)})
    write_labels(out, {
        'domain': categorical(rng.integers(0, 7, samples), [f'd{i}' for i in range(7)]),
        'quality': score(rng.uniform(0, 5, samples)),
        'topic': categorical(rng.integers(0, 13, samples), [f't{i:02d}' for i in range(13)]),
    })
    return out


@contextmanager
def local_s3(bucket: str = 'data') -> Iterator[Any]:
    """A moto S3 server on a free 127.0.0.1 port with ``bucket``; yields a boto3 client.

    Sets ``S3_ENDPOINT_URL`` (which Streaming's S3 downloader honours) and dummy credentials in
    ``os.environ`` for the duration, and restores them after.
    """
    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger('werkzeug').setLevel(logging.ERROR)  # One line per request otherwise.
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port)
    server.start()
    endpoint = f'http://127.0.0.1:{port}'
    env = {'S3_ENDPOINT_URL': endpoint, 'AWS_ACCESS_KEY_ID': 'test',
           'AWS_SECRET_ACCESS_KEY': 'test', 'AWS_DEFAULT_REGION': 'us-east-1'}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1')
        client.create_bucket(Bucket=bucket)
        yield client
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload_dir(client: Any, local: str, bucket: str, prefix: str) -> None:
    """Upload every file under ``local`` to ``s3://bucket/prefix/`` (relative paths kept)."""
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            client.upload_file(path, bucket, f'{prefix}/{os.path.relpath(path, local)}')


def cached_shards(cache: str) -> set[int]:
    """Shard numbers present in a Streaming cache directory (downloaded, never evicted)."""
    return {int(f.split('.')[1]) for f in os.listdir(cache) if f.startswith('shard.')}
