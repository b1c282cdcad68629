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
    mads_console = "streaming_mads.algorithms.agent_console:AgentConsole"

llm-foundry calls a dataloader builder as ``builder(tokenizer=..., device_batch_size=...,
**train_loader_cfg_without_name)`` and an algorithm class as ``AgentConsole(**cfg)``.

The loader itself is built by :func:`streaming_mads.run.loader.build_dataloader`, the builder
``mads train`` uses too, so a ``train_loader`` section means the same under both (see
docs/configuration.md, "Data loaders"). This module never imports llm-foundry: it only needs
Streaming, Composer and torch.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from composer.core import DataSpec

from streaming_mads.run.loader import build_dataloader

__all__ = ['build_mads_dataloader']


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
    device_batch_size=..., **train_loader)`` (without ``name``), like its ``text`` loader; it is
    :func:`~streaming_mads.run.loader.build_dataloader` with ``name: mads`` and llm-foundry's
    DataLoader defaults.

    ``dataset`` holds :class:`~streaming_mads.MADSDataset` arguments (``pool_ratio``,
    ``temperature``, ``agents``, ``selection_seed``, ...) and every
    :class:`streaming.StreamingDataset` argument (``remote``, ``local``, ``split``, ``shuffle``,
    ``shuffle_seed``, ``predownload``, ...); ``streams`` may be llm-foundry's mapping of stream
    names to :class:`streaming.Stream` arguments. Also accepted there:

    * ``tokens_column`` (default ``'tokens'``): the token-id column (an integer ndarray, or
      llm-foundry's legacy ``bytes`` decoded with ``token_encoding_type``, default ``'int64'``).
      If the samples have no such column but a ``text_column`` (default ``'text'``), texts are
      tokenised with ``tokenizer`` (docs/bring-your-own-mds.md).
    * ``max_seq_len``: samples are cut to it (tokens) or tokenised with truncation to it (text).
    * The other keys of llm-foundry's ``text`` dataset (``eos_token_id``, ``bos_token_id``, ...,
      see :data:`~streaming_mads.run.loader.FOUNDRY_TEXT_KEYS`) are accepted and ignored, so a
      ``text`` loader config turns into a ``mads`` one by renaming it (note: no ``sequence_id``
      is emitted, so there is no cross-document attention masking; ``mlm_probability`` and
      ``seq_parallel_replication > 1`` are refused). Unknown keys raise, naming the key.

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
    cfg = {'name': 'mads', 'dataset': dataset, 'drop_last': drop_last, 'num_workers': num_workers,
           'pin_memory': pin_memory, 'prefetch_factor': prefetch_factor,
           'persistent_workers': persistent_workers, 'timeout': timeout}
    return build_dataloader(cfg, tokenizer, device_batch_size)
