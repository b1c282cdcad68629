"""One data-loader builder behind `mads train` and llm-foundry's `mads` loader.

The two entry points used to build their loaders apart and disagreed: `mads train` could not read
text samples, did not cut samples to `max_seq_len`, let `dataset.batch_size` differ from the
DataLoader's and passed `prefetch_factor` to a loader without workers. Real MDS (Streaming's
MDSWriter, `mads convert`), real Trainers, two batches at most.
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
from conftest import write_labelled_stream

from streaming_mads.collate import TextCollator
from streaming_mads.convert.convert import convert
from streaming_mads.labels import score, write_labels
from streaming_mads.run.foundry import build_mads_dataloader
from streaming_mads.run.loader import build_dataloader
from streaming_mads.run.train import ConfigError, build_trainer

B = 4
WORDS = 'the data model loader stream shard agent weight sample token batch epoch'.split()


def _text_mds(root: str, tokenizer: str, docs: int = 40) -> str:
    """`mads convert --mode text` output (one sample per document, 20-60 words) with quality."""
    rng = np.random.default_rng(0)
    src = os.path.join(root, 'src')
    os.makedirs(src)
    with open(os.path.join(src, 'docs.jsonl'), 'w') as f:
        for _ in range(docs):
            f.write(json.dumps({'text': ' '.join(rng.choice(WORDS, rng.integers(20, 60)))}) + '\n')
    out = os.path.join(root, 'mds')
    convert([f'web={src}'], out, mode='text', layout='single', tokenizer=tokenizer,
            vocab_size=300, progress=False)
    write_labels(out, {'quality': score(rng.uniform(0, 5, docs))})
    return out


def _run(data: str, **extra) -> dict:
    cfg = {'max_seq_len': 16, 'global_train_batch_size': B, 'max_duration': '2ba',
           'model': {'preset': 'tiny', 'n_embd': 32},
           'train_loader': {'name': 'mads', 'dataset': {'local': data, 'pool_ratio': 2,
                                                        'agents': ['quality']}},
           'progress_bar': False, 'log_to_console': False}
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize('tokenizer,named', [('train', None), ('bytes', 'bytes')])
def test_mads_train_trains_on_text_samples(tmp_path, tokenizer, named):
    """Text samples are tokenised on the fly with the tokenizer `mads convert` recorded beside
    them, or the one `tokenizer.name` names, and cut to max_seq_len, for training and eval."""
    data = _text_mds(str(tmp_path), tokenizer)
    extra = {'tokenizer': {'name': named}} if named else {}
    cfg = _run(data, eval_loaders=[{'label': 'heldout', 'dataset': {'local': data}}],
               eval_interval='2ba', **extra)
    trainer = build_trainer(cfg)
    loader = trainer.state.train_dataloader
    assert isinstance(loader.collate_fn, TextCollator)
    batch = next(iter(loader))
    assert batch['input_ids'].shape == (B, 16)  # Every document is longer than 16 tokens.
    assert trainer.state.model.model.get_input_embeddings().num_embeddings == \
        (300 if tokenizer == 'train' else 257)
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    assert int(trainer.state.timestamp.token) == 2 * B * 16
    trainer.close()
    del trainer, loader
    gc.collect()


def test_text_samples_without_a_tokenizer_name_the_fix(tmp_path):
    data = _text_mds(str(tmp_path), 'bytes')  # --mode text with bytes records no tokenizer.
    with pytest.raises(ConfigError, match="train_loader.dataset: the samples hold text.*"
                                          "tokenizer.name"):
        build_trainer(_run(data))
    gc.collect()


def test_both_entry_points_cut_to_max_seq_len_alike(tmp_path):
    """The same data and settings give the same batch from llm-foundry's builder (its
    `dataset.max_seq_len`) and from `mads train` (the run's `max_seq_len`)."""
    data = write_labelled_stream(os.path.join(tmp_path, 'data'), range(64), seq_len=16)
    dataset = {'local': data, 'pool_ratio': 2, 'agents': ['quality']}
    spec = build_mads_dataloader(None, B, dataset={**dataset, 'max_seq_len': 8}, num_workers=0)
    foundry_batch = next(iter(spec.dataloader))
    del spec
    gc.collect()
    cfg = _run(data, max_seq_len=8, model={'preset': 'tiny', 'n_embd': 32, 'vocab_size': 128})
    cfg['train_loader'] = {'name': 'mads', 'dataset': dataset, 'num_workers': 0,
                           'prefetch_factor': 2}  # Ignored without workers, as in llm-foundry.
    trainer = build_trainer(cfg)
    train_batch = next(iter(trainer.state.train_dataloader))
    assert foundry_batch['input_ids'].shape == (B, 8)
    for key in ('input_ids', 'attention_mask', 'labels'):
        assert torch.equal(foundry_batch[key], train_batch[key]), key
    trainer.fit()  # A 16-token sample would not fit the 8-position model.
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()
    del trainer
    gc.collect()


@pytest.mark.parametrize('entry', ['foundry', 'mads train'])
def test_dataset_batch_size_is_refused_by_both(mds_dir, entry):
    """A dataset batch size apart from the DataLoader's would misalign MADS' pools."""
    dataset = {'local': mds_dir, 'batch_size': 2}
    with pytest.raises(ValueError, match='Do not set train_loader.dataset.batch_size'):
        if entry == 'foundry':
            build_mads_dataloader(None, B, dataset=dataset)
        else:
            cfg = _run(mds_dir, model={'preset': 'tiny', 'n_embd': 32, 'vocab_size': 128})
            cfg['train_loader']['dataset']['batch_size'] = 2
            build_trainer(cfg)
    gc.collect()


def test_builder_dispatches_by_name(mds_dir):
    spec = build_dataloader({'name': 'streaming', 'dataset': {'local': mds_dir}}, None, B)
    assert type(spec.dataloader.dataset).__name__ == 'StreamingDataset'
    del spec
    gc.collect()
    with pytest.raises(ConfigError, match='train_loader.dataset.version_timeout only applies to '
                                          'name: mads'):
        build_dataloader({'name': 'streaming', 'dataset': {'local': mds_dir,
                                                           'version_timeout': 5}}, None, B)
    with pytest.raises(ConfigError, match='eval_loaders.0. .x.\\.name must be mads or streaming'):
        build_dataloader({'name': 'text', 'dataset': {'local': mds_dir}}, None, B,
                         where='eval_loaders[0] (x)')


def test_a_local_dataset_without_its_split_names_the_splits_and_the_key(tmp_path):
    """A dataset whose index sits in a split folder, given without (or with another) split, is an
    error naming the split looked for, the splits there are and the key to set (Streaming's own
    error named none of them); so is a stream of `streams`."""
    from conftest import write_stream
    root = tmp_path / 'data'
    write_stream(str(root / 'train'), range(16))
    (root / 'README.md').write_text('# The training data\n')
    where = 'eval_loaders[0] (heldout)'
    with pytest.raises(ConfigError, match=r"eval_loaders\[0\] \(heldout\)\.dataset: .* no MDS "
                                          r"index at its top .* in: train\. Set eval_loaders\[0\] "
                                          r"\(heldout\)\.dataset\.split"):
        build_dataloader({'name': 'streaming', 'dataset': {'local': str(root)}}, None, B,
                         where=where)
    with pytest.raises(ConfigError, match=r"for split 'val': no .*val.index\.json\. Its MDS "
                                          r"indexes are in: train\."):
        build_dataloader({'name': 'streaming', 'dataset': {'local': str(root), 'split': 'val'}},
                         None, B, where=where)
    with pytest.raises(ConfigError, match=r'train_loader\.dataset\.streams\.web\.split'):
        build_dataloader({'name': 'mads', 'dataset': {'streams': {'web': {'local': str(root)}},
                                                      'pool_ratio': 1}}, None, B)
    with pytest.raises(ConfigError, match=r"missing does not exist \(looked for .*missing.val."
                                          r"index\.json, split 'val'\)"):
        build_dataloader({'name': 'streaming', 'dataset': {'local': str(tmp_path / 'missing'),
                                                           'split': 'val'}}, None, B)
    spec = build_dataloader({'name': 'streaming', 'dataset': {'local': str(root),
                                                              'split': 'train'}}, None, B)
    assert len(spec.dataloader.dataset) == 16
    del spec
    gc.collect()
