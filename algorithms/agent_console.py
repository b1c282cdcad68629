"""AgentConsole: the Composer algorithm that runs MADS' agent console inside a training run.

Thin by design: :meth:`AgentConsole.match` decides *when* (fit start; the end of a batch at which
a weight version is due) and :meth:`AgentConsole.apply` wires Composer's state (model, train
dataloader, device, logger) into :class:`streaming_mads.console.console.Console`, which holds the logic.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import fields
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from composer.core import Algorithm, Event, Precision, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader, Dataset

from streaming_mads.checks import (TokenizerInfo, check_run, check_token_ids, convert_info,
                                   model_vocab_size, spec_tokenizer_info, stream_convert_info,
                                   tokenizer_info)
from streaming_mads.console.console import Console, ConsoleConfig, prefetch_depth
from streaming_mads.selection.dataset import MADSDataset
from streaming_mads.influence.influence import PerSampleLoss, causal_lm_per_sample_loss, influence_memory
from streaming_mads.influence.preconditioning import check_adam

__all__ = ['AgentConsole', 'find_mads_dataset', 'load_reference']

#: Reference samples whose token ids are checked against the model before training.
_REFERENCE_CHECKED = 256

ReferenceSource = Union[str, Dataset, Sequence[dict]]

#: The autocast dtype of the influence pass under each Composer precision (fp32: none).
_AUTOCAST = {Precision.AMP_BF16: torch.bfloat16, Precision.AMP_FP16: torch.float16,
             Precision.AMP_FP8: torch.bfloat16}


def find_mads_dataset(dataloader: Any) -> MADSDataset:
    """The :class:`MADSDataset` behind a (Composer) train dataloader, or a clear error."""
    dataset = getattr(dataloader, 'dataset', None)
    if not isinstance(dataset, MADSDataset):
        raise TypeError(f'AgentConsole needs the train dataloader\'s dataset to be a '
                        f'streaming_mads.MADSDataset, found {type(dataset).__name__}. Use '
                        f'MADSDataset (YAML: train_loader.name: mads) or drop the mads_console '
                        f'algorithm for a plain baseline.')
    return dataset


def _training_tokenizer(dataset: MADSDataset) -> str:
    """The tokenizer ``mads convert`` recorded beside the training data (local or remote)."""
    found = convert_info(dataset.streams)
    if found is not None:
        root, info = found
        record = info.get('tokenizer') or {}
        if record.get('path'):
            return os.path.join(root, record['path'])
        if record.get('kind') == 'bytes':
            return 'bytes'
    raise FileNotFoundError('A text reference set needs the training tokenizer: set '
                            'mads_console.reference_tokenizer (no mads_convert.json was found '
                            'beside the training streams, locally or next to their remote index).')


def _text_to_mds(path: str, tokenizer: str, seq_len: int) -> str:
    """Tokenise a jsonl/text reference (file or directory) like the training data, into MDS."""
    from streaming_mads.convert.convert import convert
    out = os.path.join(tempfile.mkdtemp(prefix='mads_ref_'), 'reference')
    convert([f'reference={path}'], out, layout='single', seq_len=seq_len, tokenizer=tokenizer,
            progress=False)
    return out


def load_reference(source: ReferenceSource, split: Optional[str] = None,
                   local: Optional[str] = None, dataset: Optional[MADSDataset] = None,
                   tokenizer: Optional[str] = None) -> Sequence[dict]:
    """The whole reference set, with random access (each update reads only what it draws).

    Args:
        source (ReferenceSource): A local MDS directory or remote MDS URL (read with Streaming,
            a shard downloaded when one of its samples is first drawn); a jsonl/text file or
            directory of text (tokenised like the training data with the training tokenizer
            into samples of the training length); a map-style dataset; or a list of sample
            dicts. Samples must have the training samples' form (same columns and
            tokenisation), since the train collate builds their batches.
        split (str, optional): MDS split.
        local (str, optional): Cache directory for a remote MDS source (default: a temp dir).
        dataset (MADSDataset, optional): The training dataset (tokenizer and sample length of a
            text reference).
        tokenizer (str, optional): Tokenizer of a text reference (default: the one
            ``mads convert`` recorded beside the training data).
    """
    if not isinstance(source, str):
        return source  # type: ignore[return-value]
    from streaming import StreamingDataset
    is_remote = '://' in source
    if not is_remote and not os.path.isfile(os.path.join(source, split or '', 'index.json')):
        if not os.path.exists(source):
            raise FileNotFoundError(f'mads_console reference {source!r} does not exist: give '
                                    'an MDS dataset, or jsonl/text files of reference text.')
        if dataset is None:
            raise ValueError('A text reference set needs the training dataset to tokenise it.')
        seq_len = len(dataset[0]['tokens'])
        source = _text_to_mds(source, tokenizer or _training_tokenizer(dataset), seq_len)
        split = None
    return StreamingDataset(remote=source if is_remote else None,
                            local=(local or tempfile.mkdtemp(prefix='mads_ref_'))
                            if is_remote else source,
                            split=split, batch_size=1)


def _optimizer(state: State) -> Optional[torch.optim.Optimizer]:
    """The trainer's (first) optimizer, ``None`` without one."""
    return state.optimizers[0] if state.optimizers else None


def spread(samples: Sequence[dict], count: int) -> list[dict]:
    """Up to ``count`` samples evenly spaced over ``samples`` (a cheap check of a large set)."""
    n = len(samples)
    ids = np.unique(np.linspace(0, n - 1, min(count, n)).astype(int)) if n else []
    return [samples[int(i)] for i in ids]


class AgentConsole(Algorithm):
    """MADS' agent console: measures data influence on the live model and steers MADSDataset.

    At ``FIT_START`` it finds the :class:`MADSDataset` of the train dataloader, checks the lead
    against the DataLoader's prefetch depth and publishes version 0 (or, on resume, every version
    the checkpoint still needs). At the end of batch ``v·W − L`` it runs one update (probe
    influence, memories, θ) and publishes version ``v`` for batches ``[v·W, (v+1)·W)``.

    Args:
        reference (ReferenceSource): The reference set (see :func:`load_reference`).
        reference_split (str, optional): MDS split of the reference. Defaults to ``None``.
        reference_local (str, optional): Cache dir for a remote reference. Defaults to ``None``.
        reference_tokenizer (str, optional): Tokenizer of a jsonl/text reference. Defaults to
            the one ``mads convert`` recorded beside the training data.
        loss_fn (PerSampleLoss, optional): Per-sample loss adapter ``(model, batch) ->
            Tensor[B]``. Defaults to the causal-LM adapter.
        collate_fn (Callable, optional): Builds a model batch from sample dicts. Defaults to the
            train dataloader's ``collate_fn``.
        **settings: The console's settings, each a field of
            :class:`~streaming_mads.console.console.ConsoleConfig` (documented there and in
            ``docs/configuration.md``): ``update_interval``, ``probe_size``, ``lr_memory``, ...
    """

    def __init__(self,
                 reference: ReferenceSource,
                 reference_split: Optional[str] = None,
                 reference_local: Optional[str] = None,
                 reference_tokenizer: Optional[str] = None,
                 loss_fn: Optional[PerSampleLoss] = None,
                 collate_fn: Optional[Callable[[list], Any]] = None,
                 **settings: Any) -> None:
        known = [f.name for f in fields(ConsoleConfig)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f'did you mean {close[0]!r}?' if close else \
                f'the settings are {", ".join(known)} (see docs/configuration.md).'
            raise ValueError(f'mads_console has no setting {unknown[0]!r}: {hint}')
        self.config = ConsoleConfig(**settings)
        self.reference = reference
        self.reference_split = reference_split
        self.reference_local = reference_local
        self.reference_tokenizer = reference_tokenizer
        self.collate_fn = collate_fn
        self._state: Optional[State] = None
        self._resume_rng: Optional[list] = None
        self.console = Console(self.config, self._make_batch, loss_fn or causal_lm_per_sample_loss)

    def __repr__(self) -> str:
        return f'AgentConsole(update_interval={self.config.update_interval})'

    def reference_tokenizer_info(self) -> Optional[TokenizerInfo]:
        """The reference's tokenizer, when known before loading it: the ``mads_convert.json``
        of an MDS reference, or ``reference_tokenizer`` for a text one (``None``: a text
        reference tokenised with the training tokenizer, or samples given in Python)."""
        source, split = self.reference, self.reference_split
        if not isinstance(source, str):
            return None
        if '://' in source:
            return tokenizer_info(stream_convert_info(self.reference_local, source, split),
                                  'reference')
        if os.path.isfile(os.path.join(source, split or '', 'index.json')):
            return tokenizer_info(stream_convert_info(source, None, split), 'reference')
        if self.reference_tokenizer:
            return spec_tokenizer_info(self.reference_tokenizer, 'reference')
        return None

    def _check_before_training(self, state: State, dataset: MADSDataset,
                               reference: Sequence[dict]) -> None:
        """Tokenizers and vocabularies agree (see :mod:`streaming_mads.checks`), now rather
        than as an ``IndexError`` at the first update or eval."""
        evals = {ev.label: ev.dataloader.dataloader.dataset for ev in state.evaluators
                 if hasattr(getattr(ev.dataloader, 'dataloader', None), 'dataset')}
        check_run(state.model, dataset, evals, self.reference_tokenizer_info())
        check_token_ids(spread(reference, _REFERENCE_CHECKED), model_vocab_size(state.model),
                        'mads_console reference set')
        if self.config.reward == 'adam':
            check_adam(_optimizer(state))

    def _load_reference(self, dataset: MADSDataset) -> Sequence[dict]:
        return load_reference(self.reference, self.reference_split, self.reference_local, dataset,
                              self.reference_tokenizer)

    def _make_batch(self, samples: Sequence[dict]) -> Any:
        assert self._state is not None and self.collate_fn is not None
        return self._state.device.batch_to_device(self.collate_fn(list(samples)))

    def _configure_influence(self, state: State, reference: Sequence[dict], logger: Logger) -> None:
        """Run the influence pass like a training step (the trainer's micro-batch size and
        autocast dtype), then measure one probe micro-batch of it and print the expected peak,
        so a run that cannot afford it learns so before training."""
        options = self.console.influence_options
        micro = state.device_train_microbatch_size
        if options['micro_batch'] is None and isinstance(micro, int):
            options['micro_batch'] = micro
        options['autocast_dtype'] = _AUTOCAST.get(state.precision)
        size = min(options['micro_batch'] or len(reference), len(reference))
        memory = influence_memory(state.model, self._make_batch([reference[i] for i in range(size)]),
                                  self.console.loss_fn, autocast_dtype=options['autocast_dtype'],
                                  checkpoint=options['checkpoint'])
        logger.log_hyperparameters({'mads/influence_reference_grad_bytes': memory.reference_gradient,
                                    'mads/influence_peak_bytes': memory.peak})
        if dist.get_global_rank() == 0:
            measured = 'not measurable here' if memory.peak is None else \
                f'{memory.peak / 2**20:,.0f} MiB (measured on one micro-batch)'
            print(f'MADS influence pass: micro-batch {size}, autocast '
                  f'{options["autocast_dtype"]}, activation checkpointing '
                  f'{"on" if options["checkpoint"] else "off"}; expected peak above the model, '
                  f'optimizer and gradients: {measured}, of which the reference gradient '
                  f'{memory.reference_gradient / 2**20:,.0f} MiB', flush=True)

    def match(self, event: Event, state: State) -> bool:
        if event == Event.FIT_START:
            return True
        if event == Event.AFTER_DATALOADER:
            return self._resume_rng is not None
        return event == Event.BATCH_END and \
            self.console.due(int(state.timestamp.batch.value)) is not None

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            dataloader = state.train_dataloader
            dataset = find_mads_dataset(dataloader)
            self._state = state
            if self.collate_fn is None:
                self.collate_fn = getattr(dataloader, 'collate_fn', None) or \
                    DataLoader([]).collate_fn
            reference = self._load_reference(dataset)
            self._check_before_training(state, dataset, reference)
            # Versions follow the batches Composer really runs per epoch (drop_last,
            # train_subset_num_batches), not the dataset's pool count.
            per_epoch = state.dataloader_len
            self.console.attach(dataset, prefetch_depth(dataloader), reference,
                                int(per_epoch) if per_epoch is not None else None)
            logger.log_hyperparameters({f'mads/{k}': v for k, v in vars(self.config).items()})
            if self.console.needs_reference:  # The influence pass runs only with a reference.
                self._configure_influence(state, reference, logger)
            if int(state.timestamp.batch_in_epoch) == 0:
                self._resume_rng = None  # Composer restores the RNG itself at epoch starts.
            return
        if event == Event.AFTER_DATALOADER:
            # Composer restores the RNG on mid-epoch resumption only when it spins the dataloader,
            # not with Streaming's own resumption; restoring it here, right before the first
            # resumed forward, makes dropout (and so influence and weights) continue exactly.
            reproducibility.load_rng_state(self._resume_rng)
            self._resume_rng = None
            return
        batches_done = int(state.timestamp.batch.value)
        while (version := self.console.due(batches_done)) is not None:
            _, metrics = self.console.step(state.model, version, _optimizer(state))
            logger.log_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        # get_rng_state gathers every rank's RNG: Composer calls state_dict on all ranks.
        batches_done = int(self._state.timestamp.batch) if self._state is not None else None
        return {**super().state_dict(), 'console': self.console.state_dict(batches_done),
                'rng': reproducibility.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if 'console' in state:
            self.console.load_state_dict(state['console'])
        self._resume_rng = state.get('rng')
