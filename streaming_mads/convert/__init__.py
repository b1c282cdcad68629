"""Offline conversion: text, JSONL and code trees to zstd MDS shards with a tokenizer (``mads convert``)."""

from streaming_mads.convert.convert import ConvertError, convert

__all__ = ['convert', 'ConvertError']
