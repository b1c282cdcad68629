"""MADSDataset: a StreamingDataset that keeps ``B`` of every ``r·B`` candidates by agent score.

How it rides on Streaming instead of replacing it:

* The parent partitions, shuffles and downloads exactly as usual, but with a *candidate* batch
  size of ``r·B``: each worker's candidate batch ``j`` is a **pool**, and from it the worker keeps
  ``B`` samples, which become the device batch ``j``. Global batch numbers therefore match the
  parent's one to one, which is what makes the version schedule
  (:mod:`streaming_mads.selection.schedule`), elastic partitioning and
  mid-epoch resumption carry over unchanged (a resume point of ``n`` yielded samples is
  ``n · r`` candidates of the parent).
* Scores come from the memory-mapped sidecar labels and the weight version governing the batch,
  so a candidate that is not kept is never decoded (its shard is still downloaded ahead with its
  neighbours, bounded by ``predownload`` and ``cache_limit`` as usual).
* Kept samples are yielded in candidate order, preserving shard locality.

With ``pool_ratio=1`` nothing is selected away and the dataset is exactly its parent.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.selection.agents import Agent, AgentSpec, build_agent, build_agents
from streaming_mads.selection.board import Weights, WeightBoard
from streaming_mads.labels import LabelStore, StreamLabels, fetch_labels
from streaming_mads.mds_formats import SampleDecoder
from streaming_mads.selection.pools import batch_in_epoch
from streaming_mads.selection.step import gather_label_ids, pool_selections, version_tables
from streaming_mads.remote import join_path
from streaming_mads.settings import check_number
from streaming_mads.streaming_internals import (SelectingStreamingDataset, check_streaming,
                                                shared_memory_name)

__all__ = ['MADSDataset']


def _agent_specs(agents: Optional[Sequence[AgentSpec]], selecting: bool) -> Optional[list[Agent]]:
    """The agents, built (so every agent setting is checked before Streaming starts), or
    ``None`` for the default (a preset per label column present)."""
    if agents is None:
        return None
    if isinstance(agents, (str, bytes, Mapping)) or not isinstance(agents, Iterable):
        raise TypeError(f'MADSDataset agents={agents!r} is not allowed: it must be a list of agent '
                        f'specs, e.g. [quality, domain].')
    built = [build_agent(spec) for spec in agents]
    if not built and selecting:
        raise ValueError('MADSDataset agents=[] with pool_ratio > 1 is not allowed: a pool needs '
                         'at least one agent to choose by. Give agents, or pool_ratio=1 (the '
                         'parent StreamingDataset exactly, no labels needed).')
    return built


class MADSDataset(SelectingStreamingDataset):
    """A :class:`streaming.StreamingDataset` that selects samples online by agent scores.

    Accepts every argument of :class:`streaming.StreamingDataset` (``streams``, ``remote``,
    ``local``, ``shuffle``, ``shuffle_algo``, ``epoch_size``, ``predownload``, ``cache_limit``,
    ``num_canonical_nodes``, ...) with the same meaning, and yields what it yields. ``epoch_size``
    counts candidates: an epoch yields ``epoch_size / pool_ratio`` samples.

    Args:
        batch_size (int): Device batch size ``B`` (the DataLoader's); required, since selection
            keeps ``B`` of every pool.
        agents (Sequence[AgentSpec], optional): Selection agents: presets ``'quality'``,
            ``'domain'``, ``'topic'``, dicts ``{name, column, bins}`` or :class:`Agent` objects.
            Defaults to every preset whose label column exists. ``[]`` (with ``pool_ratio=1``
            only): no agents, no labels needed, exactly the parent.
        pool_ratio (float): ``r >= 1``: candidates per kept sample; ``r·B`` must be an integer.
            ``1`` selects nothing away. Defaults to ``1``.
        temperature (float): ``τ >= 0`` of Gumbel-top-k on the combined score, the one knob for
            how sharply learned weights select: at ``1`` (one agent) a candidate is kept with odds
            proportional to its value's memory weight, below 1 sharper, ``0`` is hard top-k,
            large values approach uniform. Defaults to ``1``.
        selection_seed (int): Seed of the selection noise (with epoch and pool index).
            Defaults to ``0``.
        version_timeout (float): Seconds a worker waits for an unpublished weight version before
            failing. Defaults to ``600``.
        board_capacity (int): Weight versions kept in shared memory. Defaults to ``16``.
        verify_shards (bool): Before the first sample, check every local shard file against the
            size and hash its ``index.json`` records (each file read once per node, the node's
            ranks sharing the work), refusing modified or damaged ones by stream and name
            (Streaming checks only what it downloads, given ``validate_hash``). Defaults to
            ``False``.
        tokens_column (str): Column of token ids. Where it holds llm-foundry's legacy ``bytes``
            ids, each sample yields them decoded, as an int64 array (text and array samples are
            yielded as stored). Defaults to ``'tokens'``.
        token_encoding_type (str): Dtype of legacy ``bytes`` ids, llm-foundry's setting of that
            name (``int8`` ... ``uint64``, see docs/bring-your-own-mds.md). Defaults to
            ``'int64'``.
        **kwargs: Every other :class:`streaming.StreamingDataset` argument.
    """

    def __init__(self,
                 *,
                 batch_size: Optional[int] = None,
                 agents: Optional[Sequence[AgentSpec]] = None,
                 pool_ratio: float = 1.0,
                 temperature: float = 1.0,
                 selection_seed: int = 0,
                 version_timeout: float = 600.0,
                 board_capacity: int = 16,
                 verify_shards: bool = False,
                 tokens_column: str = 'tokens',
                 token_encoding_type: str = 'int64',
                 **kwargs: Any) -> None:
        batch_size = int(check_number(batch_size, 'MADSDataset batch_size', integer=True, low=1,
                                      hint='It is the device batch size, as given to the '
                                           'DataLoader.'))
        pool_ratio = check_number(pool_ratio, 'MADSDataset pool_ratio', low=1,
                                  hint='It is candidates per kept sample (1 keeps every one).')
        pool_size = int(round(pool_ratio * batch_size))
        if abs(pool_size - pool_ratio * batch_size) > 1e-9:
            raise ValueError(f'pool_ratio x batch_size = {pool_ratio * batch_size} must be a whole '
                             f'number of candidates: pick pool_ratio as a multiple of '
                             f'1/{batch_size}.')
        temperature = check_number(temperature, 'MADSDataset temperature', low=0,
                                   hint='0 is hard top-k; larger is closer to uniform.')
        selection_seed = check_number(selection_seed, 'MADSDataset selection_seed', integer=True,
                                      low=0)
        version_timeout = check_number(version_timeout, 'MADSDataset version_timeout', low=0,
                                       low_open=True, hint='It is in seconds.')
        board_capacity = check_number(board_capacity, 'MADSDataset board_capacity', integer=True,
                                      low=2)
        specs = _agent_specs(agents, pool_size != batch_size)
        if not isinstance(verify_shards, bool):
            raise TypeError(f'MADSDataset verify_shards must be true or false, got '
                            f'{verify_shards!r}.')
        self.sample_decoder = SampleDecoder(tokens_column=tokens_column,
                                            token_encoding_type=token_encoding_type,
                                            setting='MADSDataset token_encoding_type')
        super().__init__(batch_size=pool_size, **kwargs)
        check_streaming(self)
        self.check_shard_files()  # Before any shard download: the index names are untrusted.
        if verify_shards:
            self.verify_local_shards()
        self.device_batch_size = batch_size
        self.pool_ratio = pool_size / batch_size
        self.pool_size = pool_size
        self.temperature = float(temperature)
        self.selection_seed = int(selection_seed)
        self.version_timeout = float(version_timeout)

        self.agents: list[Agent] = []
        if specs == []:  # Pool ratio 1 without agents: nothing is scored, no labels are needed.
            self.labels = LabelStore([], np.zeros(0, np.int64))
        else:
            self.labels = self._open_labels()
            available = set.intersection(*(set(s.columns) for s in self.labels.streams))
            self.agents = build_agents(specs, self.labels, sorted(available))

        # Per-rank batches of an epoch: one per pool, the last possibly partial.
        candidates = self.length
        self.batches_per_epoch = math.ceil(candidates / pool_size)
        last = candidates - (self.batches_per_epoch - 1) * pool_size
        self.selected_length = (self.batches_per_epoch - 1) * batch_size + min(batch_size, last)

        self.board = WeightBoard(shared_memory_name(self, 'mads_board'),
                                 [agent.num_values for agent in self.agents], board_capacity,
                                 create=True)
        self.publish(0, self.initial_theta(), [agent.memory for agent in self.agents])
        self._tables: dict[int, list[NDArray[np.float64]]] = {}

    # -- labels ----------------------------------------------------------------------------

    def _open_labels(self) -> LabelStore:
        streams = []
        for stream_id, stream in enumerate(self.streams):
            split_dir = os.path.join(stream.local, stream.split or '')
            fetch_labels(stream)
            name = stream.remote or stream.local
            source = join_path(stream.remote, stream.split or '') if stream.remote else None
            streams.append(StreamLabels(split_dir, int(self.samples_per_stream[stream_id]), name,
                                        source))
        return LabelStore(streams, self.sample_offset_per_stream)

    def label_ids(self, sample_ids: NDArray[np.int64]) -> list[NDArray[np.int64]]:
        """Each agent's label value id for global ``sample_ids`` (from the sidecar labels)."""
        return gather_label_ids(self.labels, self.agents, sample_ids)

    # -- weights ---------------------------------------------------------------------------

    def initial_theta(self) -> NDArray[np.float64]:
        """Equal collaborative weights (version 0 before a console publishes its own)."""
        return np.full(len(self.agents), 1.0 / max(len(self.agents), 1))

    def trainer_batches_per_epoch(self, drop_last: bool) -> int:
        """Batches per epoch a DataLoader over this dataset yields (``drop_last`` or not)."""
        return len(self) // self.device_batch_size if drop_last else self.batches_per_epoch

    def configure_schedule(self, update_interval: int, lead: int,
                           batches_per_epoch: Optional[int] = None) -> None:
        """Attach a console: set the schedule (:mod:`streaming_mads.selection.schedule`).

        Args:
            update_interval (int): ``W``, batches per version.
            lead (int): ``L``, batches ahead of its first batch that a version is published.
            batches_per_epoch (int, optional): Batches the trainer really runs per epoch (after
                the DataLoader's ``drop_last`` and the trainer's ``train_subset_num_batches``);
                global batch numbers, and so versions, follow it. Defaults to every pool.
        """
        if batches_per_epoch is None:
            batches_per_epoch = self.batches_per_epoch
        if not 1 <= batches_per_epoch <= self.batches_per_epoch:
            raise ValueError(f'batches_per_epoch={batches_per_epoch} must be between 1 and the '
                             f'{self.batches_per_epoch} pools this rank has per epoch.')
        self.board.configure(update_interval, lead, batches_per_epoch)

    def rewind_epoch(self, epoch: int) -> None:
        """Make the next iteration Streaming's epoch ``epoch`` if one outside the trainer's loop
        (a batch taken before ``Trainer.fit``) already moved Streaming's epoch counter past it.

        The schedule numbers a pool's global batch by Streaming's epoch, so that epoch must be
        the trainer's. Streaming counts an epoch per ``iter()``; a resumption state of the same
        epoch is then honoured as usual.
        """
        if self.next_epoch > epoch:
            self.next_epoch = epoch

    def publish(self, version: int, theta: NDArray, memories: Sequence[NDArray]) -> None:
        """Publish a weight version to this rank's workers (call from the rank's main process)."""
        self.board.publish(version, theta, memories)

    def weights(self, version: int) -> Optional[Weights]:
        """The published weights of ``version`` (``None`` if not published yet)."""
        return self.board.read(version)

    def score_tables(self, weights: Weights) -> list[NDArray[np.float64]]:
        """Per-agent score tables ``θ_a ŝ_a`` of a weight version (each agent's
        :meth:`~streaming_mads.selection.agents.Agent.score_table` of the published memory)."""
        return version_tables(self.agents, weights)

    # -- length and resumption -------------------------------------------------------------

    def __len__(self) -> int:
        """Samples this rank yields per epoch (``B`` per pool)."""
        return self.selected_length

    def _candidates(self, num_samples: int) -> int:
        full, rest = divmod(int(num_samples), self.device_batch_size)
        return full * self.pool_size + rest

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Resumption state after ``num_samples`` yielded samples (all ranks) this epoch.

        Each yielded batch consumed one pool, so the parent's position is ``num_samples`` scaled
        to candidates; everything else is the parent's state.
        """
        state = super().state_dict(self._candidates(num_samples), from_beginning)
        state['mads_pool_size'] = self.pool_size
        state['mads_batch_size'] = self.device_batch_size
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (refuses one taken with another pool shape)."""
        obj = dict(obj)
        pool = obj.pop('mads_pool_size', None)
        batch = obj.pop('mads_batch_size', None)
        if pool is not None and (pool, batch) != (self.pool_size, self.device_batch_size):
            raise ValueError(f'Checkpoint was taken with batch_size={batch}, pool of {pool} '
                             f'candidates, but this dataset has batch_size='
                             f'{self.device_batch_size}, pool of {self.pool_size}: resume with the '
                             'same batch_size and pool_ratio.')
        super().load_state_dict(obj)

    # -- samples ---------------------------------------------------------------------------

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """The sample, with legacy ``bytes`` token ids decoded (naming the sample and its shard
        if they are not a whole number of ``token_encoding_type`` ids)."""
        sample = super().get_item(sample_id, retry)
        column = self.sample_decoder.tokens_column
        value = sample.get(column) if isinstance(sample, dict) else None
        if isinstance(value, bytes):
            shard_id, _ = self.spanner[sample_id]
            stream = self.streams[int(self.stream_per_shard[shard_id])]
            where = (f'sample {sample_id} (shard {self.shards[shard_id].file_pairs[0][0].basename}'
                     f' of stream {stream.remote or stream.local})')
            sample[column] = self.sample_decoder.token_ids(value, where)
        return sample

    # -- selection in the workers ----------------------------------------------------------

    def _tables_for(self, version: int, batch: int) -> list[NDArray[np.float64]]:
        tables = self._tables.get(version)
        if tables is None:
            weights = self.board.wait_for(version, self.version_timeout, batch)
            tables = self.score_tables(weights)
            if len(self._tables) >= 4:
                self._tables.pop(min(self._tables))
            self._tables[version] = tables
        return tables

    def select_pools(self, sample_ids: NDArray[np.int64]) -> Iterator[tuple[int, NDArray]]:
        """For each pool of this worker's candidates: its start and the kept positions (the
        selection step, :func:`~streaming_mads.selection.step.pool_selections`, on the pools'
        places in the schedule)."""
        ranks, rank, workers, worker = self.worker_layout
        epoch, offset = self.work_position
        first_batch = offset // (self.pool_size * ranks)
        pools = np.arange(-(-len(sample_ids) // self.pool_size))
        yield from pool_selections(
            sample_ids, batch_in_epoch(first_batch, pools, workers, worker), rank, epoch,
            pool=self.pool_size, keep=self.device_batch_size, temperature=self.temperature,
            seed=self.selection_seed, num_ranks=ranks,
            schedule=self.board.schedule.with_epoch(self.batches_per_epoch),
            label_ids=self.label_ids, tables_for=self._tables_for, board=self.board, row=worker)

    def __del__(self) -> None:
        board = self.__dict__.get('board')
        if board is not None:
            board.cleanup()
        super().__del__()
