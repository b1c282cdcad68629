"""An llm-foundry pretraining YAML under `mads train`: mpt-125m.yaml's structure at tiny sizes.

tests/data/mpt-125m-tiny.yaml is llm-foundry's YAML key for key (``variables`` and
``${variables.*}`` interpolation, an MPT model, a tokenizer block, a single ``eval_loader`` of
``name: text``, ``algorithms.gradient_clipping``, ``device_eval_batch_size``, ``eval_first``,
FSDP, callbacks) with only ``train_loader.name: mads`` and ``algorithms.mads_console`` added. It
runs for real on MDS shards written here; what only llm-foundry runs is refused with its route.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from lm_corpus import VOCAB, write_corpus, write_reference

from streaming_mads.run.train import ConfigError, build_trainer, train
from streaming_mads.run.config import FOUNDRY_ROUTE, load_config

YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'mpt-125m-tiny.yaml')
ROUTE = 'composer llmfoundry/scripts/train/train.py'


@pytest.fixture(scope='module')
def data_local(tmp_path_factory):
    """llm-foundry's ``data_local`` layout: ``train`` and ``val`` splits, plus the reference."""
    root = str(tmp_path_factory.mktemp('foundry-yaml'))
    write_corpus(os.path.join(root, 'train'), n=400)
    write_corpus(os.path.join(root, 'val'), n=24, seed=3)
    write_reference(os.path.join(root, 'ref'))
    return root


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """`mads train` writes its run folder (weight history) where it runs: not in the checkout."""
    monkeypatch.chdir(tmp_path)


def _cpu(overrides):
    """The YAML's amp_bf16 needs a GPU (Composer refuses it on a CPU, as llm-foundry would)."""
    return overrides if torch.cuda.is_available() else [*overrides, 'precision=fp32']


def test_mpt_yaml_trains_with_what_llm_foundry_would_honour(data_local):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = train(YAML, _cpu([f'variables.data_local={data_local}', 'eval_first=true',
                                    'loggers.inmemory={}']))
    said = ' '.join(str(w.message) for w in caught)
    assert 'attn_impl=flash' in said and ROUTE in said  # Runs as SDPA, says so.
    assert 'fsdp_config is not applicable to a single process' in said
    state = trainer.state
    assert int(state.timestamp.batch) == 6
    # The MPT block became the GPT-2 of its sizes, with MPT's defaults where they differ.
    config = state.model.model.config
    assert (config.n_embd, config.n_head, config.n_layer, config.n_inner) == (32, 2, 2, 128)
    assert (config.n_positions, config.vocab_size) == (16, 320)
    assert config.activation_function == 'gelu'
    assert config.embd_pdrop == config.resid_pdrop == config.attn_pdrop == 0.0
    # Composer's gradient clipping by llm-foundry's name, beside the console.
    names = {type(a).__name__: a for a in state.algorithms}
    assert set(names) == {'GradientClipping', 'AgentConsole'}
    clip = names['GradientClipping']
    assert (clip.clipping_type, clip.clipping_threshold) == ('norm', 1.0)
    assert names['AgentConsole'].console.latest >= 1  # Versions were published.
    assert state.device_train_microbatch_size == 4
    # The single eval_loader (name: text) is the `eval` set, in device_eval_batch_size batches.
    (evaluator,) = state.evaluators
    assert evaluator.label == 'eval' and evaluator.dataloader.dataloader.batch_size == 4
    assert type(evaluator.dataloader.dataloader.dataset).__name__ == 'StreamingDataset'
    memory = next(d for d in trainer.logger.destinations if type(d).__name__ == 'InMemoryLogger')
    evals = [int(ts.batch) for ts, _ in memory.data['metrics/eval/LanguageCrossEntropy']]
    assert evals == [0, 3, 6]  # eval_first, then every eval_interval.
    logged = memory.hyperparameters  # log_config: the resolved config, variables gone.
    assert logged['max_seq_len'] == 16 and logged['seed'] == 17
    assert logged['train_loader']['dataset']['local'] == data_local
    assert 'variables' not in logged and '${' not in repr(logged)
    trainer.close()


def test_a_variable_changes_every_use_and_eval_loaders_take_labels(data_local):
    cfg = load_config(YAML, [f'variables.data_local={data_local}', 'variables.max_seq_len=12'])
    assert cfg['model']['max_seq_len'] == cfg['max_seq_len'] == 12
    assert cfg['tokenizer']['kwargs']['model_max_length'] == 12
    assert cfg['algorithms']['mads_console']['reference'] == data_local
    cfg = load_config(YAML, _cpu([
        f'variables.data_local={data_local}', 'eval_loader=null', 'fsdp_config=null',
        'model.attn_config.attn_impl=torch', 'device_eval_batch_size=3',
        'eval_loaders=[{label: heldout, dataset: {local: "${variables.data_local}", split: val}},'
        ' {label: ref, batch_size: 5, dataset: {local: "${variables.data_local}", split: ref}}]']))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = build_trainer(cfg)
    said = ' '.join(str(w.message) for w in caught)
    assert ROUTE not in said and 'fsdp_config' not in said  # attn_impl: torch, and no FSDP.
    sizes = {ev.label: ev.dataloader.dataloader.batch_size for ev in trainer.state.evaluators}
    assert sizes == {'heldout': 3, 'ref': 5}
    trainer.close()


@pytest.mark.parametrize('override,match', [
    ('icl_tasks=[{label: lambada}]', r'icl_tasks \(in-context-learning evaluation\)'),
    ('eval_gauntlet={weighting: EQUAL}', 'eval_gauntlet'),
    ('tp_config={strategy: ffn}', 'tp_config'),
    ('model.name=hf_causal_lm', "model.name 'hf_causal_lm'"),
    ('model.attn_config.alibi=true', r'model\.attn_config\.alibi=True'),
    ('model.norm_type=rmsnorm', 'model.norm_type'),
    ('model.ffn_config={ffn_type: mb_moe}', 'ffn_type'),
    ('algorithms.fdiff_metrics={}', 'algorithms.fdiff_metrics is unknown'),
    ('callbacks.hf_checkpointer={}', "callbacks: 'hf_checkpointer' is not one of"),
    ('scheduler.name=inv_sqrt_with_warmup', "scheduler.name 'inv_sqrt_with_warmup'"),
    ('optimizer.name=decoupled_lionw', "optimizer.name 'decoupled_lionw'"),
    ('tokenizer.name=EleutherAI/gpt-neox-20b', 'save_pretrained'),
    ('tokenizer.kwargs.padding_side=left', 'tokenizer.kwargs.padding_side'),
])
def test_what_only_llm_foundry_runs_names_the_route(data_local, override, match):
    cfg = load_config(YAML, _cpu([f'variables.data_local={data_local}', override]))
    with pytest.raises(ConfigError, match=match) as err:
        build_trainer(cfg)
    assert FOUNDRY_ROUTE in str(err.value)


@pytest.mark.parametrize('override,match', [
    ('data_local=/x', "Unknown top-level key 'data_local' .*variables"),
    ('device_train_batch_size=4', 'computed from global_train_batch_size'),
    ('eval_loaders=[]', 'eval_loader .* or eval_loaders .* not both'),
    ('tokenizer.kwargs.model_max_length=8', 'model_max_length=8 is below max_seq_len=16'),
    ('model.max_seq_len=8', r'model.max_seq_len=8 must be .* at least'),
    ('eval_first=yes please', 'eval_first must be true or false'),
    ('run_name=${variables.nope}', 'Interpolation: .*nope'),
])
def test_foundry_config_errors_name_the_key(data_local, override, match):
    with pytest.raises(ConfigError, match=match):
        build_trainer(load_config(YAML, _cpu([f'variables.data_local={data_local}', override])))


def test_the_token_data_fits_the_padded_vocabulary():
    """The tiny YAML's padding mirrors the real one: data ids and the bytes tokenizer fit it."""
    cfg = load_config(YAML)
    assert VOCAB <= 257 < cfg['model']['vocab_size']
