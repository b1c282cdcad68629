"""llm-foundry integration: the ``mads`` dataloader and the ``mads_console`` algorithm.

llm-foundry looks its registries up by name and, through ``catalogue``, also in the entry-point
groups ``llmfoundry_<registry>`` of installed packages, so with this package installed an
llm-foundry train YAML can say::

    train_loader:
      name: mads
      dataset: {local: /data/mds, shuffle: true, pool_ratio: 2, agents: [quality, domain]}
      num_workers: 4
    algorithms:
      mads_console: {reference: /data/reference-mds, update_interval: 100}

The entry points (declared in ``pyproject.toml``) are::

    [project.entry-points."llmfoundry_dataloaders"]
    mads = "streaming_mads.run.foundry:build_mads_dataloader"

    [project.entry-points."llmfoundry_algorithms"]
    mads_console = "algorithms.agent_console:AgentConsole"

llm-foundry calls a dataloader builder as ``builder(tokenizer=..., device_batch_size=...,
**train_loader_cfg_without_name)`` and an algorithm class as ``AgentConsole(**cfg)``.

This module never imports llm-foundry: it only needs Streaming, Composer and torch.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from composer.core import DataSpec
from torch.utils.data import DataLoader

from streaming_mads.collate import IGNORE_INDEX, TokenCollator

__all__ = ['build_mads_dataloader', 'TextCollator', 'count_tokens', 'FOUNDRY_TEXT_KEYS']

# Keys of llm-foundry's ``text`` dataset config that are not StreamingDataset arguments; they are
# accepted (so a ``text`` YAML switches to ``mads`` by changing its name) and used or ignored here.
FOUNDRY_TEXT_KEYS = frozenset({
    'max_seq_len', 'eos_token_id', 'bos_token_id', 'token_encoding_type', 'mlm_probability',
    'override_eos_token_id_mismatch_error', 'override_bos_token_id_mismatch_error',
    'seq_parallel_replication', 'tokenizer_name'
})


class _TruncatingTokenCollator(TokenCollator):
    """:class:`TokenCollator` that first cuts every sample's tokens to ``max_seq_len``."""

    def __init__(self, column: str = 'tokens', pad_id: int = 0,
                 max_seq_len: Optional[int] = None) -> None:
        super().__init__(column, pad_id)
        self.max_seq_len = max_seq_len

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.max_seq_len is not None:
            samples = [{**s, self.column: np.asarray(s[self.column])[:self.max_seq_len]}
                       if self.column in s else s for s in samples]
        return super().__call__(samples)


class TextCollator:
    """Tokenise a text column with a Hugging Face tokenizer, then collate like TokenCollator.

    Each text is tokenised on its own (no special tokens added beyond the tokenizer's defaults),
    cut to ``max_seq_len`` and right-padded with ``pad_id``; padding is masked and labelled -100.

    Args:
        tokenizer: A ``transformers`` tokenizer (callable on a list of strings).
        max_seq_len (int, optional): Truncation length; ``None`` keeps whole texts.
        column (str): Sample column holding the text. Defaults to ``'text'``.
        pad_id (int): Padding id. Defaults to the tokenizer's pad, else EOS, else ``0``.
    """

    def __init__(self, tokenizer: Any, max_seq_len: Optional[int] = None, column: str = 'text',
                 pad_id: Optional[int] = None) -> None:
        if tokenizer is None:
            raise ValueError(f'The MDS samples hold text in {column!r}: the mads dataloader needs '
                             f'a tokenizer to tokenise it (llm-foundry passes the run\'s '
                             f'`tokenizer`).')
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.column = column
        self.collate = TokenCollator('tokens', _pad_id(tokenizer) if pad_id is None else pad_id)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        try:
            texts = [s[self.column] for s in samples]
        except KeyError as err:
            raise KeyError(f'Samples have no {self.column!r} column (they have '
                           f'{sorted(samples[0])}).') from err
        kwargs: dict[str, Any] = {}
        if self.max_seq_len is not None:
            kwargs = {'truncation': True, 'max_length': self.max_seq_len}
        encoded = self.tokenizer(texts, **kwargs)['input_ids']
        return self.collate([{'tokens': np.asarray(ids, np.int64)} for ids in encoded])


def _pad_id(tokenizer: Any) -> int:
    for attr in ('pad_token_id', 'eos_token_id'):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def count_tokens(batch: Any) -> Union[int, dict[str, int]]:
    """Composer token count of a collated batch: non-padding and loss-generating tokens.

    Matches llm-foundry's ``get_tokens_per_batch_func`` for decoder-only batches: ``total`` is the
    attention mask's sum and ``loss_generating`` the shifted labels that are not -100.
    """
    if not isinstance(batch, Mapping) or 'input_ids' not in batch:
        raise ValueError('count_tokens needs a dict batch with `input_ids`.')
    mask = batch.get('attention_mask')
    total = int(mask.sum().item()) if mask is not None else int(batch['input_ids'].numel())
    labels = batch.get('labels')
    if labels is None:
        return total
    return {'total': total, 'loss_generating': int((labels[:, 1:] != IGNORE_INDEX).sum().item())}


def _batch_size(device_batch_size: Union[int, float]) -> int:
    if isinstance(device_batch_size, bool) or not float(device_batch_size).is_integer() or \
            device_batch_size < 1:
        raise ValueError(f'The mads dataloader needs a whole, positive device batch size (one '
                         f'selection pool per batch); got {device_batch_size!r}.')
    return int(device_batch_size)


def streams_from_config(streams: Any,
                        where: str = 'train_loader.dataset.streams') -> Optional[list[Any]]:
    """llm-foundry's ``streams: {name: {remote, local, ...}}`` (or a list) as Stream objects.

    Used by this dataloader and by ``mads train`` (:mod:`streaming_mads.run.train`), whose YAML has the
    same ``streams`` section.

    Args:
        streams (Any): A mapping of stream names to ``Stream`` arguments, a list of such argument
            mappings, or ``None``. ``Stream`` objects among them are kept as they are.
        where (str): The config key, named in errors. Defaults to
            ``'train_loader.dataset.streams'``.

    Returns:
        list[Stream], optional: The streams, or ``None`` for ``None``.

    Raises:
        ValueError: For any other type, or arguments ``Stream`` refuses (naming the stream).
    """
    from streaming import Stream
    if streams is None:
        return None
    if isinstance(streams, Mapping):
        items = list(streams.items())
    elif isinstance(streams, (list, tuple)):
        items = [(str(i), spec) for i, spec in enumerate(streams)]
    else:
        raise ValueError(f'{where} must map stream names to {{remote, local, split, proportion, '
                         'repeat, choose}.')
    out = []
    for name, spec in items:
        if isinstance(spec, Stream):
            out.append(spec)
            continue
        try:
            out.append(Stream(**dict(spec or {})))
        except (TypeError, ValueError) as err:
            raise ValueError(f'{where}.{name}: {err}') from err
    return out


def _columns(dataset: Any) -> set[str]:
    names: set[str] = set()
    for shard in getattr(dataset, 'shards', [])[:1]:
        names.update(getattr(shard, 'column_names', None) or getattr(shard, 'columns', None) or [])
    return names


def build_mads_dataloader(tokenizer: Any = None,
                          device_batch_size: Union[int, float] = 1,
                          dataset: Optional[dict[str, Any]] = None,
                          drop_last: bool = False,
                          num_workers: int = 0,
                          pin_memory: Optional[bool] = None,
                          prefetch_factor: Optional[int] = 2,
                          persistent_workers: bool = True,
                          timeout: float = 0) -> DataSpec:
    """llm-foundry dataloader builder ``mads``: a DataSpec over a :class:`MADSDataset`.

    Called by llm-foundry's ``build_dataloader`` as ``build_mads_dataloader(tokenizer=...,
    device_batch_size=..., **train_loader)`` (without ``name``), like its ``text`` loader.

    ``dataset`` holds :class:`~streaming_mads.MADSDataset` arguments (``pool_ratio``,
    ``temperature``, ``agents``, ``selection_seed``, ...) and every
    :class:`streaming.StreamingDataset` argument (``remote``, ``local``, ``split``, ``shuffle``,
    ``shuffle_seed``, ``predownload``, ...); ``streams`` may be llm-foundry's mapping of stream
    names to :class:`streaming.Stream` arguments. Also accepted there:

    * ``tokens_column`` (default ``'tokens'``): the token-id column, collated by
      :class:`~streaming_mads.collate.TokenCollator` (``mads convert`` output). If the samples have
      no such column but a ``text_column`` (default ``'text'``), texts are tokenised with
      ``tokenizer`` by :class:`TextCollator`.
    * ``max_seq_len``: samples are cut to it (tokens) or tokenised with truncation to it (text).
    * The other keys of llm-foundry's ``text`` dataset (``eos_token_id``, ``bos_token_id``, ...,
      see :data:`FOUNDRY_TEXT_KEYS`) are accepted and ignored, so a ``text`` loader config turns
      into a ``mads`` one by renaming it (note: no ``sequence_id`` is emitted, so there is no
      cross-document attention masking; ``mlm_probability`` and ``seq_parallel_replication > 1``
      are refused). Unknown keys raise, naming the key.

    Batches are ``{'input_ids', 'attention_mask', 'labels'}`` with padding masked and labelled
    -100, as llm-foundry's causal-LM models expect.

    Args:
        tokenizer: The run's tokenizer (only needed for text samples; pads with its pad/EOS id).
        device_batch_size (int): Samples per device batch; MADS keeps this many of every
            ``pool_ratio x device_batch_size`` candidates.
        dataset (dict): Dataset config (see above).
        drop_last (bool): DataLoader ``drop_last``. Defaults to ``False``.
        num_workers (int): DataLoader workers. Defaults to ``0``.
        pin_memory (bool, optional): Defaults to whether CUDA is available.
        prefetch_factor (int, optional): Batches prefetched per worker (ignored without workers).
            Defaults to ``2``.
        persistent_workers (bool): Keep workers between epochs (ignored without workers).
            Defaults to ``True``.
        timeout (float): DataLoader timeout. Defaults to ``0``.

    Returns:
        DataSpec: The DataLoader with llm-foundry-style token counting.
    """
    from streaming_mads.selection.dataset import MADSDataset

    if not dataset:
        raise ValueError('The mads dataloader needs a `dataset` config (remote/local or streams, '
                         'and MADS settings such as pool_ratio and agents).')
    batch_size = _batch_size(device_batch_size)
    cfg = dict(dataset)
    if 'batch_size' in cfg:
        raise ValueError('Do not set train_loader.dataset.batch_size for the mads dataloader: it '
                         'is the device batch size (global_train_batch_size / world size).')
    tokens_column = cfg.pop('tokens_column', 'tokens')
    text_column = cfg.pop('text_column', 'text')
    max_seq_len = cfg.get('max_seq_len')
    if max_seq_len is not None:
        if float(max_seq_len) != int(max_seq_len) or int(max_seq_len) < 1:
            raise ValueError(f'max_seq_len must be a positive integer, got {max_seq_len!r}.')
        max_seq_len = int(max_seq_len)
    if cfg.get('mlm_probability'):
        raise ValueError('mlm_probability: the mads dataloader builds causal-LM batches only.')
    if (cfg.get('seq_parallel_replication') or 1) > 1:
        raise ValueError('seq_parallel_replication > 1 is not supported by the mads dataloader.')
    for key in FOUNDRY_TEXT_KEYS:
        cfg.pop(key, None)
    if 'streams' in cfg:
        cfg['streams'] = streams_from_config(cfg['streams'])
    try:
        mads = MADSDataset(batch_size=batch_size, **cfg)
    except TypeError as err:
        raise ValueError(f'train_loader.dataset: {err}') from err

    columns = _columns(mads)
    if tokens_column in columns or not columns or text_column not in columns:
        collate_fn: Any = _TruncatingTokenCollator(tokens_column, _pad_id(tokenizer), max_seq_len)
    else:
        collate_fn = TextCollator(tokenizer, max_seq_len, text_column)

    workers = int(num_workers)
    loader = DataLoader(
        mads,
        batch_size=batch_size,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=bool(persistent_workers) and workers > 0,
        timeout=timeout,
    )
    return DataSpec(dataloader=loader, get_num_tokens_in_batch=count_tokens)
