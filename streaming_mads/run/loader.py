"""The one data-loader builder of ``mads train`` and of llm-foundry's ``mads`` dataloader.

Both entry points read the same config (``{name, dataset: {...}, num_workers, ...}``), so they
build their loaders here, in the style of llm-foundry's ``build_dataloader``: one function that
dispatches by ``name`` (``mads``: :class:`MADSDataset`; ``streaming``: a plain
:class:`StreamingDataset`, the uniform baseline and the eval sets). The sample format (each of
llm-foundry's three, :mod:`streaming_mads.mds_formats`), the cut to ``max_seq_len``, the
batch-size guard and token counting are decided once, so a config behaves the same under either.
The long form is docs/configuration.md ("Data loaders") and docs/bring-your-own-mds.md.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

if TYPE_CHECKING:
    from composer.core import DataSpec

__all__ = ['ConfigError', 'build_dataloader', 'streams_from_config', 'FOUNDRY_TEXT_KEYS',
           'LOADER_NAMES']

#: The ``name`` values :func:`build_dataloader` dispatches on.
LOADER_NAMES = ('mads', 'streaming')

# Keys of llm-foundry's ``text`` dataset config that are not StreamingDataset arguments; they are
# accepted (so a ``text`` YAML switches to ``mads`` by changing its name) and used or ignored here
# (``token_encoding_type`` is used, and popped before these).
FOUNDRY_TEXT_KEYS = frozenset({
    'max_seq_len', 'eos_token_id', 'bos_token_id', 'mlm_probability',
    'override_eos_token_id_mismatch_error', 'override_bos_token_id_mismatch_error',
    'seq_parallel_replication', 'tokenizer_name'
})


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the key."""


def streams_from_config(streams: Any,
                        where: str = 'train_loader.dataset.streams') -> Optional[list[Any]]:
    """llm-foundry's ``streams: {name: {remote, local, ...}}`` (or a list) as Stream objects.

    Args:
        streams (Any): A mapping of stream names to ``Stream`` arguments, a list of such argument
            mappings, or ``None``. ``Stream`` objects among them are kept as they are.
        where (str): The config key, named in errors. Defaults to
            ``'train_loader.dataset.streams'``.

    Returns:
        list[Stream], optional: The streams, or ``None`` for ``None``.

    Raises:
        ConfigError: For any other type, or arguments ``Stream`` refuses (naming the stream).
    """
    from streaming import Stream
    if streams is None:
        return None
    if isinstance(streams, Mapping):
        items = list(streams.items())
    elif isinstance(streams, (list, tuple)):
        items = [(str(i), spec) for i, spec in enumerate(streams)]
    else:
        raise ConfigError(f'{where} must map stream names to {{remote, local, split, proportion, '
                          'repeat, choose}.')
    out = []
    for name, spec in items:
        if isinstance(spec, Stream):
            out.append(spec)
            continue
        try:
            out.append(Stream(**dict(spec or {})))
        except (TypeError, ValueError) as err:
            raise ConfigError(f'{where}.{name}: {err}') from err
    return out


def _batch_size(device_batch_size: Union[int, float]) -> int:
    if isinstance(device_batch_size, bool) or not float(device_batch_size).is_integer() or \
            device_batch_size < 1:
        raise ConfigError(f'The data loader needs a whole, positive device batch size (one '
                          f'selection pool per batch); got {device_batch_size!r}.')
    return int(device_batch_size)


def _max_seq_len(value: Any, bound: Optional[int], where: str) -> Optional[int]:
    """The cut: ``dataset.max_seq_len`` if set (at most ``bound``), else ``bound``."""
    if value is None:
        return bound
    if isinstance(value, bool) or float(value) != int(value) or int(value) < 1:
        raise ConfigError(f'{where}.dataset.max_seq_len must be a positive integer, got '
                          f'{value!r}.')
    if bound is not None and int(value) > bound:
        raise ConfigError(f'{where}.dataset.max_seq_len={value} exceeds the run\'s max_seq_len='
                          f'{bound} (the model\'s context).')
    return int(value)


def _check_local_indexes(dataset_cfg: Mapping[str, Any], where: str) -> None:
    """Each dataset or stream given by a local path has an MDS index for its split.

    Streaming's own error names neither the splits there are nor the key to set; this one does
    (for a remote, the local path is a cache and is not checked).
    """
    from streaming_mads.remote import is_url, split_not_found
    default_split = dataset_cfg.get('split')
    streams = dataset_cfg.get('streams')
    if streams is None:
        places: list[tuple[Any, str]] = [(dataset_cfg, f'{where}.dataset')]
    elif isinstance(streams, Mapping):
        places = [(spec, f'{where}.dataset.streams.{name}') for name, spec in streams.items()]
    elif isinstance(streams, (list, tuple)):
        places = [(spec, f'{where}.dataset.streams.{i}') for i, spec in enumerate(streams)]
    else:
        return  # streams_from_config names the error.
    for spec, key in places:
        if isinstance(spec, Mapping):
            remote, local, split = spec.get('remote'), spec.get('local'), spec.get('split')
        else:  # A streaming.Stream.
            remote, local = getattr(spec, 'remote', None), getattr(spec, '_local', None)
            split = getattr(spec, 'split', None)
        path = remote or local
        if not isinstance(path, str) or is_url(path):
            continue
        split_key = f'{key}.split' if split or streams is None else \
            f'{key}.split (or {where}.dataset.split)'
        message = split_not_found(f'{key}: the dataset at', path, split or default_split,
                                  split_key)
        if message is not None:
            raise ConfigError(message)


def _dataset_class(name: str, where: str) -> type:
    from streaming import StreamingDataset

    from streaming_mads.selection.dataset import MADSDataset
    classes = {'mads': MADSDataset, 'streaming': StreamingDataset}
    if name not in classes:
        raise ConfigError(f'{where}.name must be mads or streaming, got {name!r}.')
    return classes[name]


def _mads_only_keys() -> set[str]:
    """:class:`MADSDataset` arguments a plain StreamingDataset does not take."""
    from streaming import StreamingDataset

    from streaming_mads.selection.dataset import MADSDataset
    ours = set(inspect.signature(MADSDataset).parameters)
    return ours - set(inspect.signature(StreamingDataset).parameters) - {'kwargs'}


def _stream_formats(dataset: Any, tokens_column: str, text_column: str,
                    where: str) -> set[str]:
    """The sample format of each stream of ``dataset``, from its first shard's column encodings
    (checked before any shard is read: a wrong one fails here, not in a worker)."""
    from streaming_mads.mds_formats import SampleFormatError, column_format
    formats: set[str] = set()
    seen: set[int] = set()
    for shard, stream_id in zip(dataset.shards, dataset.stream_per_shard):
        if int(stream_id) in seen:
            continue
        seen.add(int(stream_id))
        stream = dataset.streams[int(stream_id)]
        name = stream.remote or stream.local
        if not hasattr(shard, 'column_encodings'):
            continue  # Not MDS (JSONL, CSV shards): decoded as each sample comes.
        encodings = dict(zip(shard.column_names, shard.column_encodings))
        try:
            formats.add(column_format(encodings, tokens_column, text_column,
                                      where=f'{where}.dataset: stream {name}',
                                      hint=f'Set {where}.dataset.tokens_column or text_column '
                                           f'to the column holding them.')[0])
        except SampleFormatError as err:
            raise ConfigError(str(err)) from err
    return formats


def _recorded_tokenizer(dataset: Any) -> Any:
    """The tokenizer ``mads convert`` recorded beside ``dataset`` (``mads_convert.json``), or
    ``None``."""
    from streaming_mads.checks import convert_info, dataset_streams
    from streaming_mads.tokenizer import tokenizer_from_record
    found = convert_info(dataset_streams(dataset))
    if found is None or not (found[1].get('tokenizer') or {}).get('kind'):
        return None
    return tokenizer_from_record(found[1]['tokenizer'], found[0])


def _collator(dataset: Any, tokenizer: Any, tokens_column: str, text_column: str,
              token_encoding_type: str, max_seq_len: Optional[int], where: str) -> Any:
    """The collator of every stream's format; text needs a tokenizer (given, or recorded)."""
    from streaming_mads.collate import TextCollator, TokenCollator
    from streaming_mads.mds_formats import SampleDecoder
    key = f'{where}.dataset'
    text = 'text' in _stream_formats(dataset, tokens_column, text_column, where)
    if text and tokenizer is None:
        tokenizer = _recorded_tokenizer(dataset)
    fix = 'set tokenizer.name (mads train) or the run\'s tokenizer (llm-foundry)'
    if text and tokenizer is None:
        raise ConfigError(f'{key}: the samples hold text ({text_column!r}), and no tokenizer was '
                          f'given or recorded beside the data (mads_convert.json): {fix}.')
    decoder = SampleDecoder(tokenizer, max_seq_len=max_seq_len, tokens_column=tokens_column,
                            text_column=text_column, token_encoding_type=token_encoding_type,
                            setting=f'{key}.token_encoding_type', tokenizer_key=fix,
                            where=f'a sample of {key}')
    return TextCollator(decoder=decoder) if text else TokenCollator(decoder=decoder)


def build_dataloader(cfg: Mapping[str, Any],
                     tokenizer: Any = None,
                     device_batch_size: Union[int, float] = 1,
                     *,
                     max_seq_len: Optional[int] = None,
                     where: str = 'train_loader') -> DataSpec:
    """A DataSpec over the dataset ``cfg['name']`` names, with causal-LM batches.

    ``cfg`` is a ``train_loader`` (or eval loader) section:

    * ``name``: ``mads`` (default; :class:`~streaming_mads.MADSDataset`) or ``streaming`` (a plain
      :class:`streaming.StreamingDataset`; MADS-only arguments such as ``pool_ratio`` are refused).
    * ``dataset``: the dataset's arguments, except ``batch_size`` (always ``device_batch_size``:
      a different one would misalign MADS' pools with the batches); ``streams`` may be a mapping
      of stream names to :class:`streaming.Stream` arguments (or a list). Also accepted there:
      ``tokens_column`` (default ``'tokens'``: token ids, an integer ndarray or llm-foundry's
      legacy ``bytes``), ``token_encoding_type`` (default ``'int64'``: the dtype of legacy
      ``bytes`` ids), ``text_column`` (default ``'text'``, used when the samples have no token
      column: texts are tokenised with ``tokenizer``, else with the tokenizer ``mads convert``
      recorded beside the data), ``max_seq_len`` (the cut, at most the ``max_seq_len``
      argument) and llm-foundry's other ``text`` keys (:data:`FOUNDRY_TEXT_KEYS`, ignored;
      ``mlm_probability`` and ``seq_parallel_replication > 1`` are refused). Each stream's
      format is checked from its index before the loader is returned.
    * Every other key goes to :class:`torch.utils.data.DataLoader`. ``pin_memory`` defaults to
      whether CUDA is available; ``prefetch_factor`` and ``persistent_workers`` are dropped
      without workers (where torch refuses them).

    Args:
        cfg (Mapping[str, Any]): The loader section (see above).
        tokenizer: A ``transformers`` or :class:`streaming_mads.tokenizer.Tokenizer` tokenizer,
            for text samples and the padding id; ``None`` pads token samples with ``0``.
        device_batch_size (int): Samples per device batch; MADS keeps this many of every
            ``pool_ratio x device_batch_size`` candidates.
        max_seq_len (int, optional): The model's context: samples are cut to it.
        where (str): The config key, named in errors. Defaults to ``'train_loader'``.

    Returns:
        DataSpec: The DataLoader, counting tokens as llm-foundry does (padding excluded).

    Raises:
        ConfigError: Naming the key, for any setting the dataset or DataLoader refuses.
    """
    # Imported here, as the rest of `mads train` imports: importing ConfigError stays cheap.
    import torch
    from composer.core import DataSpec
    from torch.utils.data import DataLoader

    from streaming_mads.collate import count_tokens
    from streaming_mads.mds_formats import SampleFormatError, check_token_encoding_type
    from streaming_mads.streaming_internals import check_shard_files
    loader = dict(cfg)
    name = loader.pop('name', None) or 'mads'
    dataset_cls = _dataset_class(name, where)
    dataset_cfg = loader.pop('dataset', None)
    if not dataset_cfg:
        raise ConfigError(f'{where} needs a `dataset` config (remote/local or streams, and for '
                          f'mads its settings such as pool_ratio and agents).')
    if not isinstance(dataset_cfg, Mapping):
        raise ConfigError(f'{where}.dataset must be a mapping, got {type(dataset_cfg).__name__}.')
    batch_size = _batch_size(device_batch_size)
    dataset_cfg = dict(dataset_cfg)
    if 'batch_size' in dataset_cfg or 'batch_size' in loader:
        key = f'{where}.dataset.batch_size' if 'batch_size' in dataset_cfg else f'{where}.batch_size'
        raise ConfigError(f'Do not set {key}: the dataset and the DataLoader both take the device '
                          f'batch size (global_train_batch_size / world size).')
    tokens_column = dataset_cfg.pop('tokens_column', 'tokens')
    text_column = dataset_cfg.pop('text_column', 'text')
    token_encoding_type = dataset_cfg.pop('token_encoding_type', 'int64')
    try:
        check_token_encoding_type(token_encoding_type, f'{where}.dataset.token_encoding_type')
    except SampleFormatError as err:
        raise ConfigError(str(err)) from err
    if name == 'mads':  # It decodes legacy bytes itself, naming the sample that fails.
        dataset_cfg.update(tokens_column=tokens_column, token_encoding_type=token_encoding_type)
    cut = _max_seq_len(dataset_cfg.get('max_seq_len'), max_seq_len, where)
    if dataset_cfg.get('mlm_probability'):
        raise ConfigError(f'{where}.dataset.mlm_probability: these loaders build causal-LM '
                          f'batches only.')
    if (dataset_cfg.get('seq_parallel_replication') or 1) > 1:
        raise ConfigError(f'{where}.dataset.seq_parallel_replication > 1 is not supported.')
    for key in FOUNDRY_TEXT_KEYS:
        dataset_cfg.pop(key, None)
    misplaced = sorted(_mads_only_keys() & set(dataset_cfg)) if name != 'mads' else []
    if misplaced:
        raise ConfigError(f'{where}.dataset.{misplaced[0]} only applies to name: mads.')
    _check_local_indexes(dataset_cfg, where)
    if 'streams' in dataset_cfg:
        dataset_cfg['streams'] = streams_from_config(dataset_cfg['streams'],
                                                     f'{where}.dataset.streams')
    try:
        dataset = dataset_cls(batch_size=batch_size, **dataset_cfg)
    except (TypeError, ValueError) as err:  # Unknown keys and bad values, named by location.
        raise ConfigError(f'{where}.dataset: {err}') from err
    check_shard_files(dataset)  # A plain StreamingDataset fetches shards by unchecked names.

    collate_fn = _collator(dataset, tokenizer, tokens_column, text_column, token_encoding_type,
                           cut, where)
    workers = int(loader.pop('num_workers', 0) or 0)
    pin_memory = loader.pop('pin_memory', None)
    prefetch_factor = loader.pop('prefetch_factor', None)
    persistent_workers = loader.pop('persistent_workers', False)
    try:
        dataloader = DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
            prefetch_factor=prefetch_factor if workers > 0 else None,
            persistent_workers=bool(persistent_workers) and workers > 0, **loader)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'{where}: {err}') from err
    return DataSpec(dataloader=dataloader, get_num_tokens_in_batch=count_tokens)
