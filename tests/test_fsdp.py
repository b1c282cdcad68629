"""Influence under FSDP: two gloo ranks on the CPU, against the unsharded model.

Torch's FSDP1 (``FullyShardedDataParallel``, Composer's default) needs an accelerator, so on the
CPU the sharded path is exercised with FSDP2 (``fully_shard``, Composer's ``FSDP_VERSION=2``):
``reshard_after_forward=True`` is FULL_SHARD, ``False`` is SHARD_GRAD_OP. The FSDP1 test runs
where CUDA is available (``benchmarks/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import pytest
import torch
from test_influence import lm_batch, make_gpt2
from test_multirank import _env, _spawn

from streaming_mads.influence import per_sample_influence, reference_gradient

RTOL = 1e-4  # fp32: sharded vs unsharded, relative to the largest |influence| / |gradient|.
OPTIONS = dict(micro_batch=2, checkpoint=True)


def _cat(batches: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _reference(rank: int) -> Dict[str, torch.Tensor]:
    return lm_batch(3, seed=10 + rank)


def _probes(rank: int) -> Any:
    return lm_batch(5, seed=20) if rank == 0 else None  # Rank 1 has none: it pads the lockstep.


def _local(tensor: Any) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, 'to_local') else tensor).detach().clone()


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> List[torch.Tensor]:
    """This rank's shards of the parameters, gradients and optimizer state."""
    out = [_local(p) for p in model.parameters()] + [_local(p.grad) for p in model.parameters()]
    for state in opt.state.values():
        out += [_local(v) for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def _full_params(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter in full, under its unwrapped name (collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    with FullyShardedDataParallel.summon_full_params(model) if isinstance(
            model, FullyShardedDataParallel) else torch.no_grad():
        return {n.replace('_fsdp_wrapped_module.', ''):
                (p.full_tensor() if hasattr(p, 'full_tensor') else p).detach().cpu().clone()
                for n, p in model.named_parameters()}


def _sharded_run(rank: int, world: int, model: torch.nn.Module, out: str, name: str) -> None:
    from streaming_mads.influence import causal_lm_per_sample_loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    causal_lm_per_sample_loss(model, lm_batch(4, seed=9 + rank)).mean().backward()
    opt.step()  # Gradients and optimizer state exist, as at the end of a batch.
    before = _snapshot(model, opt)
    grad = reference_gradient(model, _reference(rank), num_samples=3 * world, **OPTIONS)
    influence = per_sample_influence(model, _probes(rank), grad, **OPTIONS)
    after = _snapshot(model, opt)
    untouched = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    full = _full_params(model)
    torch.save({'influence': influence, 'grad': [g.cpu() for g in grad.values()], 'params': full,
                'untouched': untouched}, os.path.join(out, f'{name}-rank{rank}.pt'))


def _fsdp2_main(rank: int, world: int, port: int, out: str) -> None:
    _env(rank, world, port)
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group('gloo')
    for name, reshard in (('full_shard', True), ('shard_grad_op', False)):
        model = make_gpt2(n_layer=2).float()
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        _sharded_run(rank, world, model, out, name)
    dist.destroy_process_group()


def _check_against_unsharded(out: str, name: str, world: int = 2) -> None:
    results = [torch.load(os.path.join(out, f'{name}-rank{r}.pt')) for r in range(world)]
    assert all(r['untouched'] for r in results), name  # Parameters, .grad, optimizer state.
    assert all(len(r['influence']) == 0 for r in results[1:])
    model = make_gpt2(n_layer=2).float()
    model.load_state_dict(results[0]['params'], strict=False)  # The weights after the step.
    grad = reference_gradient(model, _cat([_reference(r) for r in range(world)]))
    expected = per_sample_influence(model, _probes(0), grad)
    for result in results:
        for got, want in zip(result['grad'], grad.values()):
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= RTOL * float(want.abs().max()) + 1e-9
    got = results[0]['influence']
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= RTOL * float(expected.abs().max()), (got, expected)


def test_fsdp2_full_shard_and_shard_grad_op_match_unsharded(tmp_path) -> None:
    _spawn(_fsdp2_main, 2, (str(tmp_path),), timeout=240)
    for name in ('full_shard', 'shard_grad_op'):
        _check_against_unsharded(str(tmp_path), name)


def _fsdp1_main(rank: int, world: int, port: int, out: str) -> None:
    _env(rank, world, port)
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    dist.init_process_group('nccl' if torch.cuda.device_count() >= world else 'gloo')
    torch.cuda.set_device(rank % torch.cuda.device_count())
    for name, strategy in (('full_shard', ShardingStrategy.FULL_SHARD),
                           ('shard_grad_op', ShardingStrategy.SHARD_GRAD_OP)):
        model = FullyShardedDataParallel(make_gpt2(n_layer=2).float(), sharding_strategy=strategy,
                                         auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
                                         use_orig_params=True, device_id=torch.cuda.current_device())
        _sharded_run(rank, world, model, out, name)
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='torch FSDP1 needs an accelerator')
def test_fsdp1_matches_unsharded(tmp_path) -> None:
    world = max(1, min(2, torch.cuda.device_count()))
    _spawn(_fsdp1_main, world, (str(tmp_path),), timeout=240)
    for name in ('full_shard', 'shard_grad_op'):
        _check_against_unsharded(str(tmp_path), name, world)


def _composer_main(rank: int, world: int, port: int, data: str, ref: str, out: str) -> None:
    _env(rank, world, port)
    os.environ['FSDP_VERSION'] = '2'  # Composer's fully_shard path, the one that runs on a CPU.
    from composer.loggers import InMemoryLogger
    from lm_corpus import make_trainer

    mem = InMemoryLogger()
    trainer, algo, _ = make_trainer(
        data, ref, max_duration='14ba', loggers=[mem],
        console={'reference_size': 6, 'probe_size': 6, 'probe_micro_batch': 2},
        parallelism_config={'fsdp': {'reshard_after_forward': True}})
    assert type(trainer.state.model.model).__name__.startswith('FSDP')
    trainer.fit()
    state = algo.console.state_dict()
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f:
        json.dump({'theta': state['theta'], 'agents': state['agents'],
                   'updates': len(mem.data['mads/update_time_s']),
                   'options': {k: str(v) for k, v in algo.console.influence_options.items()}}, f)


def test_composer_fsdp_run_with_the_console(tmp_path) -> None:
    from lm_corpus import write_corpus, write_reference
    data = write_corpus(os.path.join(tmp_path, 'data'))
    ref = write_reference(os.path.join(tmp_path, 'ref'))
    _spawn(_composer_main, 2, (data, ref, str(tmp_path)), timeout=300)
    a, b = (json.load(open(os.path.join(tmp_path, f'rank{r}.json'))) for r in range(2))
    assert a == b and a['updates'] == 2
    assert a['options'] == {'micro_batch': '2', 'checkpoint': 'True', 'autocast_dtype': 'None'}
    assert a['agents'][1]['memory'] != [1.0, 1.0, 1.0]  # The updates moved the weights.


@pytest.mark.parametrize('name', ['gpu-125m.yaml', 'gpu-1b.yaml'])
def test_gpu_yamls_shard_with_fsdp(name: str) -> None:
    from composer.utils.parallelism import FSDPConfig

    from streaming_mads.run.config import load_config
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'yamls', name))
    fsdp = FSDPConfig(**cfg['fsdp_config'])  # Composer accepts every key.
    assert fsdp.sharding_strategy == 'FULL_SHARD' and fsdp.use_orig_params
    assert cfg['precision'] == 'amp_bf16' and 'mads_console' in cfg['algorithms']
