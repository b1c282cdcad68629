"""AgentConsole: the Composer algorithm that runs MADS' agent console inside a training run.

Thin by design, like Composer's own algorithms: :meth:`AgentConsole.match` decides *when* (fit
start; the end of a batch at which a weight version is due) and :meth:`AgentConsole.apply` wires
Composer's state (model, train dataloader, device, precision, logger) into
:class:`~streaming_mads.console.console.Console`, which holds the logic; the reference set is
:mod:`streaming_mads.console.reference`'s. docs/architecture.md has the long form.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TextIO

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Algorithm, Event, Precision, State
from composer.loggers import ConsoleLogger, Logger, ProgressBarLogger
from composer.utils import format_name_with_dist, reproducibility
from torch.utils.data import DataLoader

from streaming_mads.checks import TokenizerInfo, check_run, model_vocab_size
from streaming_mads.console.config import console_config
from streaming_mads.console.console import Console, prefetch_depth
from streaming_mads.console.history import History, HistorySetting
from streaming_mads.console.reference import (ReferenceSource, check_reference_ids,
                                              load_reference, reference_tokenizer_info)
from streaming_mads.distributed import get_rank
from streaming_mads.influence import PerSampleLoss, causal_lm_per_sample_loss, influence_memory
from streaming_mads.influence.preconditioning import check_adam
from streaming_mads.selection.dataset import MADSDataset

__all__ = ['AgentConsole', 'find_mads_dataset']

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


def _match_trainer(state: State, dataloader: Any, dataset: MADSDataset) -> None:
    """Make the DataLoader's batches the trainer's, which the version schedule counts.

    One DataLoader batch must be one pool, so its ``batch_size`` must be the dataset's (a
    mismatch would make the workers count batches the trainer never runs, and wait forever for
    their versions). And a batch taken before ``fit`` (a sanity check) started Streaming's epoch
    0 already, so the trainer's first epoch would be Streaming's epoch 1, numbered an epoch ahead:
    Streaming's epoch is rewound to the trainer's (the fit then sees exactly what it would have
    without the peek). Composer spins the loader itself to a later epoch it resumes without the
    dataset's state, so that case is left to it.
    """
    size = getattr(dataloader, 'batch_size', None) if isinstance(dataloader, DataLoader) else None
    if isinstance(dataloader, DataLoader) and size != dataset.device_batch_size:
        raise ValueError(f'The train DataLoader has batch_size={size} but its MADSDataset has '
                         f'batch_size={dataset.device_batch_size}: a DataLoader batch must be one '
                         f'selected pool, so give both the same device batch size '
                         f'(DataLoader(dataset, batch_size={dataset.device_batch_size}, ...)).')
    epoch = int(state.timestamp.epoch)
    if epoch == 0 or state.dataset_resumption.get('train'):
        dataset.rewind_epoch(epoch)


def _local_save_folder(state: State) -> Optional[str]:
    """The folder the Trainer saves checkpoints in, when it is local (``None``: none, or remote)."""
    for callback in state.callbacks:
        if isinstance(callback, CheckpointSaver) and callback.remote_uploader is None:
            return format_name_with_dist(callback.folder, state.run_name)
    return None


def _console_stream(logger: Logger) -> Optional[TextIO]:
    """Where the trainer prints (its progress bar's or console logger's stream), if it does."""
    for destination in logger.destinations:
        if isinstance(destination, (ProgressBarLogger, ConsoleLogger)):
            return destination.stream
    return None


def _optimizer(state: State) -> Optional[torch.optim.Optimizer]:
    """The trainer's (first) optimizer, ``None`` without one."""
    return state.optimizers[0] if state.optimizers else None


class AgentConsole(Algorithm):
    """MADS' agent console: measures data influence on the live model and steers MADSDataset.

    At ``FIT_START`` it finds the :class:`MADSDataset` of the train dataloader, checks the lead
    against the DataLoader's prefetch depth and publishes version 0 (or, on resume, every version
    the checkpoint still needs). When the schedule says version ``v`` is due (see
    :mod:`streaming_mads.selection.schedule`) it runs one update (probe influence, memories, θ)
    and publishes ``v``.

    Args:
        reference (ReferenceSource): The reference set (see
            :func:`~streaming_mads.console.reference.load_reference`).
        reference_split (str, optional): MDS split of the reference. Defaults to ``None``.
        reference_local (str, optional): Cache dir for a remote reference. Defaults to ``None``.
        reference_tokenizer (str, optional): Tokenizer of a jsonl/text reference. Defaults to
            the one ``mads convert`` recorded beside the training data.
        loss_fn (PerSampleLoss, optional): Per-sample loss adapter ``(model, batch) ->
            Tensor[B]``. Defaults to the causal-LM adapter.
        collate_fn (Callable, optional): Builds a model batch from sample dicts. Defaults to the
            train dataloader's ``collate_fn``.
        history (HistorySetting): Where the weight history (one JSON record per version) goes:
            a path (``{run_name}`` is replaced by the run's name), ``None`` (``mads_history.jsonl``
            in the Trainer's local ``save_folder``; no file without one) or ``False`` (no file).
            Rank 0 prints one line per update and a summary at the end either way
            (:mod:`streaming_mads.console.history`). Defaults to ``None``.
        **settings: The console's settings, each a field of
            :class:`~streaming_mads.console.config.ConsoleConfig` (documented there and in
            ``docs/configuration.md``): ``update_interval``, ``probe_size``, ``lr_memory``, ...
    """

    #: The YAML section named in errors, and the ConsoleConfig fields it takes (None: all).
    section = 'mads_console'
    setting_names: Optional[tuple[str, ...]] = None

    def __init__(self,
                 reference: ReferenceSource,
                 reference_split: Optional[str] = None,
                 reference_local: Optional[str] = None,
                 reference_tokenizer: Optional[str] = None,
                 loss_fn: Optional[PerSampleLoss] = None,
                 collate_fn: Optional[Callable[[list], Any]] = None,
                 history: HistorySetting = None,
                 **settings: Any) -> None:
        self.config = console_config(settings, self.section, self.setting_names)
        self.history = History(history, self.section)
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
        """The reference's tokenizer, when known before loading it (``mads train`` checks it)."""
        return reference_tokenizer_info(self.reference, self.reference_split,
                                        self.reference_local, self.reference_tokenizer)

    def _check_before_training(self, state: State, dataset: MADSDataset,
                               reference: Sequence[dict]) -> None:
        """Tokenizers and vocabularies agree (see :mod:`streaming_mads.checks`), now rather
        than as an ``IndexError`` at the first update or eval."""
        evals = {ev.label: ev.dataloader.dataloader.dataset for ev in state.evaluators
                 if hasattr(getattr(ev.dataloader, 'dataloader', None), 'dataset')}
        check_run(state.model, dataset, evals, self.reference_tokenizer_info())
        check_reference_ids(reference, model_vocab_size(state.model),
                            getattr(self.collate_fn, 'decoder', None))
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
        if get_rank() == 0:
            measured = 'not measurable here' if memory.peak is None else \
                f'{memory.peak / 2**20:,.0f} MiB (measured on one micro-batch)'
            print(f'MADS influence pass: micro-batch {size}, autocast '
                  f'{options["autocast_dtype"]}, activation checkpointing '
                  f'{"on" if options["checkpoint"] else "off"}; expected peak above the model, '
                  f'optimizer and gradients: {measured}, of which the reference gradient '
                  f'{memory.reference_gradient / 2**20:,.0f} MiB', flush=True)

    def match(self, event: Event, state: State) -> bool:
        if event in (Event.FIT_START, Event.FIT_END):
            return True
        if event == Event.AFTER_DATALOADER:
            return self._resume_rng is not None
        return event == Event.BATCH_END and \
            self.console.due(int(state.timestamp.batch.value)) is not None

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            dataloader = state.train_dataloader
            dataset = find_mads_dataset(dataloader)
            _match_trainer(state, dataloader, dataset)
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
            self.history.start(self.history.path_for(state.run_name, _local_save_folder(state)),
                               int(state.timestamp.batch), self.console.latest,
                               self.console.weights_record(), _console_stream(logger))
            if self.console.needs_reference:  # The influence pass runs only with a reference.
                self._configure_influence(state, reference, logger)
            if int(state.timestamp.batch_in_epoch) == 0:
                self._resume_rng = None  # Composer restores the RNG itself at epoch starts.
            return
        if event == Event.FIT_END:
            self.console.detach()  # Nothing publishes now: a worker needing more fails at once.
            self.history.finish()
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
            update, metrics = self.console.step(state.model, version, _optimizer(state))
            logger.log_metrics(metrics)
            assert self.console.last_record is not None
            self.history.add(batches_done, version, self.console.last_record, metrics,
                             skipped=update is None)

    def state_dict(self) -> dict[str, Any]:
        # get_rng_state gathers every rank's RNG: Composer calls state_dict on all ranks.
        batches_done = int(self._state.timestamp.batch) if self._state is not None else None
        return {**super().state_dict(), 'console': self.console.state_dict(batches_done),
                'rng': reproducibility.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if 'console' in state:
            self.console.load_state_dict(state['console'])
        self._resume_rng = state.get('rng')
