"""Tokenizer identity everywhere: a vocabulary fingerprint recorded by `mads convert` and `mads
label`, compared before training whether or not `mads_convert.json` exists, and ids beyond a
tokenizer's vocabulary refused, never dropped.

Real `mads convert` outputs (two byte-level BPEs of the same size trained on different words),
llm-foundry-style copies of them (shards only, no `mads_convert.json`), real `mads label` and real
`mads train` configs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
from test_checks import SEQ, WORDS_A, WORDS_B, _convert, _text

from streaming_mads.checks import TokenizerMismatchError
from streaming_mads.convert_record import CONVERT_INFO_NAME, read_convert_info
from streaming_mads.labels import LabelError, read_manifest, score, write_labels
from streaming_mads.run.cli import main
from streaming_mads.run.train import build_trainer
from streaming_mads.tokenizer import load_tokenizer, tokenizer_identity


def _bare(converted: str, out: str) -> str:
    """An llm-foundry-style copy: the shards and index only (no record, no tokenizer)."""
    shutil.copytree(converted, out, ignore=shutil.ignore_patterns(CONVERT_INFO_NAME, 'tokenizer'))
    return out


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    """BPE A and BPE B (same vocabulary size, other words), converted and bare."""
    root = str(tmp_path_factory.mktemp('identity'))
    a = _convert(os.path.join(root, 'a'), _text(os.path.join(root, 'ta'), WORDS_A, 0), 'train')
    b = _convert(os.path.join(root, 'b'), _text(os.path.join(root, 'tb'), WORDS_B, 1), 'train')
    tok_a, tok_b = os.path.join(root, 'tok_a'), os.path.join(root, 'tok_b')
    shutil.copytree(os.path.join(a, 'tokenizer'), tok_a)
    shutil.copytree(os.path.join(b, 'tokenizer'), tok_b)
    return {'a': a, 'b': b, 'tok_a': tok_a, 'tok_b': tok_b, 'root': root,
            'bare_a': _bare(a, os.path.join(root, 'bare_a')),
            'bare_b': _bare(b, os.path.join(root, 'bare_b'))}


def test_the_fingerprint_is_the_vocabulary_and_mads_convert_records_it(sets):
    from transformers import PreTrainedTokenizerFast
    a, b = load_tokenizer(sets['tok_a']), load_tokenizer(sets['tok_b'])
    assert a.vocab_size == b.vocab_size == 300  # Same size: only the fingerprint tells them apart.
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 16
    hf_dir = os.path.join(sets['root'], 'a_as_transformers')
    PreTrainedTokenizerFast(tokenizer_file=os.path.join(sets['tok_a'], 'tokenizer.json'),
                            eos_token='<|endoftext|>').save_pretrained(hf_dir)
    same = load_tokenizer(hf_dir)
    assert same.kind == 'transformers' and same.fingerprint == a.fingerprint
    assert load_tokenizer('bytes').fingerprint == load_tokenizer('bytes').fingerprint
    assert read_convert_info(sets['a'])['tokenizer']['fingerprint'] == a.fingerprint


def test_ids_beyond_the_vocabulary_are_an_error_not_dropped(sets, capsys):
    """The reported case: `mads label --tokenizer bytes` on BPE ids dropped every id >= 256."""
    data = _bare(sets['a'], os.path.join(sets['root'], 'label_bytes'))
    assert main(['label', data, '--tokenizer', 'bytes', '--topics', '2', '--workers', '1',
                 '--no-progress']) == 2
    err = capsys.readouterr().err
    assert 'Stream label_bytes' in err and 'outside the bytes tokenizer\'s 257 ids' in err
    bad = int(re.search(r'token id (\d+)', err).group(1))  # The offending id is named ...
    assert bad >= 257 and bad in np.concatenate(_token_arrays(data))  # ... and is in the data.
    assert 'pass the tokenizer that encoded it as --tokenizer' in err
    assert read_manifest(data) is None  # Nothing was written.
    with pytest.raises(Exception, match='outside the bytes tokenizer'):
        load_tokenizer('bytes').decode_batch([np.asarray([72, 105, 300])])


def _samples(data: str) -> int:
    with open(os.path.join(data, 'index.json')) as f:
        return sum(s['samples'] for s in json.load(f)['shards'])


def _token_arrays(data: str) -> list[np.ndarray]:
    from streaming import StreamingDataset
    ds = StreamingDataset(local=data, batch_size=1)
    return [ds[i]['tokens'] for i in range(ds.num_samples)]


def test_mads_label_refuses_a_tokenizer_other_than_the_recorded_one(sets, capsys):
    data = os.path.join(sets['root'], 'label_other')
    shutil.copytree(sets['a'], data)
    assert main(['label', data, '--tokenizer', sets['tok_b'], '--columns', 'quality',
                 '--workers', '1', '--no-progress']) == 2
    err = capsys.readouterr().err
    fa, fb = load_tokenizer(sets['tok_a']).fingerprint, load_tokenizer(sets['tok_b']).fingerprint
    assert fa in err and fb in err and 'Drop --tokenizer' in err


def test_labels_record_the_tokenizer_and_refuse_mixing_two(sets):
    data = _bare(sets['a'], os.path.join(sets['root'], 'label_a'))
    assert main(['label', data, '--tokenizer', sets['tok_a'], '--columns', 'quality',
                 '--workers', '1', '--no-progress']) == 0
    recorded = read_manifest(data)['tokenizer']
    assert recorded == tokenizer_identity(load_tokenizer(sets['tok_a']))
    n = read_manifest(data)['num_samples']
    other = tokenizer_identity(load_tokenizer(sets['tok_b']))
    with pytest.raises(LabelError, match=f'quality.*{recorded["fingerprint"]}.*'
                                         f'{other["fingerprint"]}.*--tokenizer'):
        write_labels(data, {'extra': score(np.zeros(n))}, tokenizer=other)
    write_labels(data, {'extra': score(np.zeros(n))})  # No tokenizer: the recorded one is kept.
    assert read_manifest(data)['tokenizer'] == recorded


def _cfg(data: str, reference: str, evals: str, **extra) -> dict:
    cfg = {
        'max_seq_len': SEQ, 'global_train_batch_size': 4, 'max_duration': '2ba',
        'model': {'preset': 'tiny', 'n_embd': 32, 'vocab_size': 300},
        'train_loader': {'name': 'mads', 'dataset': {'local': data, 'pool_ratio': 2,
                                                     'agents': ['quality']}},
        'eval_loaders': [{'label': 'heldout', 'dataset': {'local': evals}}],
        'algorithms': {'mads_console': {'reference': reference, 'update_interval': 2,
                                        'probe_size': 4, 'reference_size': 4}},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope='module')
def labelled_bare_a(sets):
    """Training data with no mads_convert.json, labelled with `--tokenizer` A."""
    data = _bare(sets['a'], os.path.join(sets['root'], 'train_a'))
    assert main(['label', data, '--tokenizer', sets['tok_a'], '--columns', 'quality',
                 '--workers', '1', '--no-progress']) == 0
    return data


def test_without_mads_convert_json_the_labels_fingerprint_is_compared(sets, labelled_bare_a):
    """The reported case: a reference of another BPE of the same size trained to the end."""
    with pytest.raises(TokenizerMismatchError) as err:
        build_trainer(_cfg(labelled_bare_a, sets['b'], sets['bare_a']))
    msg = str(err.value)
    assert 'reference' in msg and 'labels of the training data' in msg
    assert sets['b'] in msg and os.path.join(labelled_bare_a, 'mads', 'manifest.json') in msg


def test_a_dataset_nothing_records_gets_one_warning_naming_it_and_the_fix(sets, labelled_bare_a):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = build_trainer(_cfg(labelled_bare_a, sets['bare_b'], sets['bare_a']))
    trainer.close()
    mine = [str(w.message) for w in caught if 'could not check the tokenizer' in str(w.message)]
    assert len(mine) == 1
    assert f"reference ({sets['bare_b']})" in mine[0]
    assert f"eval set 'heldout' ({sets['bare_a']})" in mine[0]
    assert 'mads convert --tokenizer' in mine[0] and 'mads label DIR --tokenizer' in mine[0]


def test_the_yaml_tokenizer_is_compared_when_the_data_records_none(sets):
    """No record beside the training data: the run's tokenizer.name stands for it."""
    data = _bare(sets['a'], os.path.join(sets['root'], 'unrecorded'))
    write_labels(data, {'quality': score(np.zeros(_samples(data)))})  # No tokenizer recorded.
    cfg = _cfg(data, sets['a'], sets['b'], tokenizer={'name': sets['tok_a']})
    with pytest.raises(TokenizerMismatchError,
                       match=r"eval set 'heldout'.*tokenizer.name of the run.*tok_a"):
        build_trainer(cfg)


def test_eval_ids_past_the_model_are_an_error_before_training(sets, labelled_bare_a, tmp_path):
    from streaming import MDSWriter
    evals = str(tmp_path / 'evals')
    with MDSWriter(out=evals, columns={'tokens': 'ndarray:int32'}) as w:
        for i in range(8):
            w.write({'tokens': np.arange(SEQ, dtype=np.int32) + 295 + i})
    with pytest.raises(TokenizerMismatchError, match=r"eval set 'heldout' holds token ids up to"):
        build_trainer(_cfg(labelled_bare_a, sets['a'], evals))


def test_a_record_whose_tokenizer_was_replaced_is_refused(sets, tmp_path):
    data = str(tmp_path / 'swapped')
    shutil.copytree(sets['a'], data)
    shutil.rmtree(os.path.join(data, 'tokenizer'))
    shutil.copytree(sets['tok_b'], os.path.join(data, 'tokenizer'))
    record = read_convert_info(data)['tokenizer']
    from streaming_mads.tokenizer import TokenizerError, tokenizer_from_record
    with pytest.raises(TokenizerError, match=f'fingerprint .*{record["fingerprint"]}'):
        tokenizer_from_record(record, data)
    with open(os.path.join(data, CONVERT_INFO_NAME)) as f:
        assert json.load(f)['tokenizer']['fingerprint'] == record['fingerprint']
