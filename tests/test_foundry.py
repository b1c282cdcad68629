"""llm-foundry integration: the ``mads`` dataloader builder and the ``mads_console`` algorithm.

The first group runs everywhere (no llm-foundry needed). The second imports llm-foundry and is
skipped, with the reason, where it is not importable; it was last run against llm-foundry 0.22.0
(with mosaicml 0.32.1, mosaicml-streaming 0.12.0, torch 2.7.0, transformers 4.51.3).
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import logging
import os

import numpy as np
import pytest
import torch
from composer.core import DataSpec
from conftest import DOMAINS, write_labelled_stream
from streaming import MDSWriter

from streaming_mads.algorithms import AgentConsole
from streaming_mads import MADSDataset, categorical, write_labels
from streaming_mads.collate import TextCollator, count_tokens
from streaming_mads.run.foundry import build_mads_dataloader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 4
SEQ = 8
ENTRY_POINTS = {
    'llmfoundry_dataloaders': ('mads', build_mads_dataloader),
    'llmfoundry_algorithms': ('mads_console', AgentConsole),
}
NO_FOUNDRY = 'llm-foundry is not installed (pip install llm-foundry to run its registry tests)'


def _release(spec: DataSpec) -> None:
    """Drop a loader's dataset so a later one may reuse its local directory."""
    del spec
    gc.collect()


def _tiny_tokenizer():
    """A word-level ``transformers`` tokenizer built in memory (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ['<pad>', '<eos>', '<unk>'] + [f'w{i}' for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='<eos>',
                                   unk_token='<unk>')


def _write_text_stream(out: str, n: int) -> str:
    """MDS of ``{'text'}`` samples (1 to 12 words) with a domain sidecar label."""
    with MDSWriter(out=out, columns={'text': 'str'}, compression='zstd') as w:
        for i in range(n):
            w.write({'text': ' '.join(f'w{(i + k) % 40}' for k in range(1 + i % 12))})
    write_labels(out, {'domain': categorical(np.arange(n) % len(DOMAINS), DOMAINS)})
    return out


# -- without llm-foundry -----------------------------------------------------------------------


def test_builder_yields_token_batches(mds_dir):
    spec = build_mads_dataloader(
        tokenizer=None, device_batch_size=B,
        dataset={'local': mds_dir, 'shuffle': True, 'shuffle_seed': 3, 'pool_ratio': 2,
                 'agents': ['domain', 'quality'], 'eos_token_id': 0, 'max_seq_len': SEQ},
        drop_last=False, num_workers=0)
    assert isinstance(spec, DataSpec)
    assert isinstance(spec.dataloader.dataset, MADSDataset)
    assert spec.dataloader.dataset.pool_size == 2 * B
    batch = next(iter(spec.dataloader))
    assert set(batch) == {'input_ids', 'attention_mask', 'labels'}
    assert batch['input_ids'].shape == (B, SEQ) and batch['input_ids'].dtype == torch.long
    assert torch.equal(batch['labels'], batch['input_ids'])  # Fixed length: nothing padded.
    assert spec.get_num_tokens_in_batch(batch) == B * SEQ
    assert spec.get_num_tokens_in_batch(batch, token_type='loss_generating') == B * (SEQ - 1)
    _release(spec)


def test_builder_truncates_to_max_seq_len(mds_dir):
    spec = build_mads_dataloader(None, B, dataset={'local': mds_dir, 'max_seq_len': 5})
    batch = next(iter(spec.dataloader))
    assert batch['input_ids'].shape == (B, 5)
    _release(spec)


def test_builder_tokenises_a_text_column(tmp_path):
    local = _write_text_stream(os.path.join(tmp_path, 'text'), 64)
    tokenizer = _tiny_tokenizer()
    spec = build_mads_dataloader(tokenizer, B, dataset={'local': local, 'max_seq_len': 6,
                                                        'pool_ratio': 2, 'agents': ['domain']})
    assert isinstance(spec.dataloader.collate_fn, TextCollator)
    batch = next(iter(spec.dataloader))
    lengths = batch['attention_mask'].sum(1)
    assert batch['input_ids'].shape[1] <= 6 and int(lengths.max()) == batch['input_ids'].shape[1]
    padded = batch['attention_mask'] == 0
    assert (batch['input_ids'][padded] == tokenizer.pad_token_id).all()
    assert (batch['labels'][padded] == -100).all()
    assert (batch['labels'][~padded] == batch['input_ids'][~padded]).all()
    assert count_tokens(batch)['total'] == int(lengths.sum())
    _release(spec)


def test_builder_rejects_bad_configs(mds_dir):
    with pytest.raises(ValueError, match='needs a `dataset`'):
        build_mads_dataloader(None, B)
    with pytest.raises(ValueError, match='whole, positive device batch size'):
        build_mads_dataloader(None, 2.5, dataset={'local': mds_dir})
    with pytest.raises(ValueError, match='batch_size'):
        build_mads_dataloader(None, B, dataset={'local': mds_dir, 'batch_size': 8})
    with pytest.raises(ValueError, match='train_loader.dataset: .*no_such_key'):
        build_mads_dataloader(None, B, dataset={'local': mds_dir, 'no_such_key': 1})
    with pytest.raises(ValueError, match='causal-LM'):
        build_mads_dataloader(None, B, dataset={'local': mds_dir, 'mlm_probability': 0.15})
    gc.collect()


def _load(target: str):
    module, _, attr = target.partition(':')
    obj = importlib.import_module(module.strip())
    for part in attr.strip().split('.'):
        obj = getattr(obj, part)
    return obj


def test_pyproject_declares_the_entry_points():
    tomllib = pytest.importorskip('tomllib', reason='tomllib needs Python 3.11+')
    path = os.path.join(ROOT, 'pyproject.toml')
    if not os.path.isfile(path):
        pytest.skip('no pyproject.toml beside the tests (installed package)')
    with open(path, 'rb') as f:
        declared = tomllib.load(f)['project'].get('entry-points', {})
    for group, (name, obj) in ENTRY_POINTS.items():
        assert name in declared.get(group, {}), f'pyproject.toml lacks {group}.{name}'
        assert _load(declared[group][name]) is obj


def _installed_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found = {}
    for group, (name, _) in ENTRY_POINTS.items():
        for ep in importlib.metadata.entry_points(group=group):
            if ep.name == name:
                found[group] = ep
    return found


def test_installed_entry_point_metadata():
    found = _installed_entry_points()
    if not found:
        pytest.skip('streaming-mads is installed without its llm-foundry entry points '
                    '(reinstall it: pip install -e .)')
    assert set(found) == set(ENTRY_POINTS)
    for group, ep in found.items():
        assert ep.load() is ENTRY_POINTS[group][1]
        assert ep.dist is None or ep.dist.metadata['Name'] in ('streaming-mads', 'streaming_mads')


# -- with llm-foundry --------------------------------------------------------------------------


@pytest.fixture
def foundry(monkeypatch):
    """llm-foundry's registry; our names registered by hand where entry points are not installed."""
    registry = pytest.importorskip('llmfoundry.registry', reason=NO_FOUNDRY)
    import catalogue
    for group, (name, obj) in ENTRY_POINTS.items():
        reg = registry.dataloaders if group.endswith('dataloaders') else registry.algorithms
        if reg.get_entry_point(name) is None:
            monkeypatch.setitem(catalogue.REGISTRY, (*reg.namespace, name), obj)
    return registry


def test_foundry_registries_resolve_our_names(foundry):
    assert foundry.dataloaders.entry_point_namespace == 'llmfoundry_dataloaders'
    assert foundry.algorithms.entry_point_namespace == 'llmfoundry_algorithms'
    assert foundry.dataloaders.get('mads') is build_mads_dataloader
    assert foundry.algorithms.get('mads_console') is AgentConsole
    assert 'mads' in foundry.dataloaders.get_all()
    assert 'mads_console' in foundry.algorithms.get_all()


def test_foundry_loads_our_entry_points(foundry):
    if not _installed_entry_points():
        pytest.skip('streaming-mads is installed without its llm-foundry entry points '
                    '(reinstall it: pip install -e .)')
    # Straight from the package metadata, as an llm-foundry run without our import would see it.
    assert foundry.dataloaders.get_entry_point('mads') is build_mads_dataloader
    assert foundry.algorithms.get_entry_point('mads_console') is AgentConsole


def test_foundry_builds_the_mads_dataloader(foundry, tmp_path):
    from llmfoundry.data.dataloader import build_dataloader
    local = write_labelled_stream(os.path.join(tmp_path, 'data'), range(96), seq_len=SEQ)
    cfg = {'name': 'mads',
           'dataset': {'local': local, 'shuffle': True, 'shuffle_seed': 1, 'max_seq_len': SEQ,
                       'pool_ratio': 2, 'temperature': 0.5, 'agents': ['quality', 'domain']},
           'drop_last': True, 'num_workers': 0}
    spec = build_dataloader(cfg, _tiny_tokenizer(), B)
    assert isinstance(spec, DataSpec)
    dataset = spec.dataloader.dataset
    assert isinstance(dataset, MADSDataset) and dataset.pool_size == 2 * B
    assert [a.column for a in dataset.agents] == ['quality', 'domain']
    batch = next(iter(spec.dataloader))
    assert batch['input_ids'].shape == (B, SEQ)
    assert spec.get_num_tokens_in_batch(batch) == B * SEQ
    _release(spec)


def test_foundry_builds_the_mads_console(foundry, tmp_path):
    from composer.core import Algorithm
    from llmfoundry.utils.builders import build_algorithm
    reference = write_labelled_stream(os.path.join(tmp_path, 'ref'), range(16))
    console = build_algorithm('mads_console', {'reference': reference, 'update_interval': 20,
                                               'probe_size': 8})
    assert isinstance(console, AgentConsole) and isinstance(console, Algorithm)
    assert console.config.update_interval == 20 and console.config.probe_size == 8


def test_foundry_trains_from_a_yaml(foundry, tmp_path):
    """llm-foundry's own ``train_from_yaml`` with a ``mads`` train loader and ``mads_console``."""
    from llmfoundry.command_utils import train_from_yaml
    from transformers import GPT2Config
    data = write_labelled_stream(os.path.join(tmp_path, 'data'), range(200), seq_len=16)
    reference = write_labelled_stream(os.path.join(tmp_path, 'ref'), range(1000, 1016), seq_len=16)
    _tiny_tokenizer().save_pretrained(os.path.join(tmp_path, 'tokenizer'))
    GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=2,
               n_head=2).save_pretrained(os.path.join(tmp_path, 'gpt2'))
    yaml = f"""
max_seq_len: 16
seed: 17
model: {{name: hf_causal_lm, pretrained_model_name_or_path: {tmp_path}/gpt2, pretrained: false}}
tokenizer: {{name: {tmp_path}/tokenizer, kwargs: {{model_max_length: 16}}}}
train_loader:
  name: mads
  dataset: {{local: {data}, shuffle: true, shuffle_seed: 17, max_seq_len: 16, pool_ratio: 2,
             temperature: 0.5, agents: [quality, domain, topic]}}
  drop_last: true
  num_workers: 0
algorithms:
  mads_console: {{reference: {reference}, update_interval: 4, probe_size: 8, probe_pool: 64,
                  reference_size: 8}}
optimizer: {{name: decoupled_adamw, lr: 1.0e-3}}
scheduler: {{name: constant_with_warmup, t_warmup: 2ba}}
max_duration: 8ba
global_train_batch_size: {B}
device_train_microbatch_size: {B}
device_eval_batch_size: {B}
precision: fp32
progress_bar: false
log_to_console: false
"""
    path = os.path.join(tmp_path, 'train.yaml')
    with open(path, 'w') as f:
        f.write(yaml)
    # train() points logging at pytest's captured streams; put it back so nothing logs to them
    # once they are closed (Composer's engine logs again at exit).
    root = logging.getLogger()
    names = ('llmfoundry', 'llmfoundry.command_utils.train', 'streaming', 'composer')
    saved = (list(root.handlers), root.level, [logging.getLogger(n).level for n in names])
    try:
        trainer = train_from_yaml(path)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in zip(names, saved[2]):
            logging.getLogger(name).setLevel(level)
    dataset = trainer.state.train_dataloader.dataset
    assert isinstance(dataset, MADSDataset) and dataset.pool_size == 2 * B
    assert [type(a) for a in trainer.state.algorithms] == [AgentConsole]
    assert int(trainer.state.timestamp.batch) == 8
    assert int(trainer.state.timestamp.token) == 8 * B * 16  # Our token counter at work.
    assert dataset.board.latest >= 1  # The console published weight versions.
    trainer.close()
    del trainer, dataset
    gc.collect()


def test_foundry_loads_a_converted_tokenizer(foundry, tmp_path):
    """``tokenizer: {name: <mads convert output>/tokenizer}`` in an llm-foundry YAML goes through
    ``build_tokenizer``, which must load the BPE ``mads convert --tokenizer train`` saved."""
    from llmfoundry.utils.builders import build_tokenizer

    from streaming_mads.convert.convert import convert
    from streaming_mads.tokenizer import load_tokenizer
    text = ' '.join(f'w{i % 40} and w{(i * 7) % 40}.' for i in range(400))
    (tmp_path / 'docs.txt').write_text(text)
    out = tmp_path / 'mds'
    convert([str(tmp_path / 'docs.txt')], str(out), seq_len=16, tokenizer='train',
            vocab_size=300, progress=False)
    ours = load_tokenizer(str(out / 'tokenizer' / 'tokenizer.json'))
    theirs = build_tokenizer(str(out / 'tokenizer'), {'model_max_length': 16})
    assert theirs.eos_token_id == ours.eos_id
    sample = 'w3 and w21. w7 and w9.'
    assert theirs(sample, add_special_tokens=False)['input_ids'] == \
        ours.encode_batch([sample])[0].tolist()
