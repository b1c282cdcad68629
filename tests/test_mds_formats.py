"""Every llm-foundry MDS sample format, labelled by `mads label` and trained by `mads train`, the
Python API and the llm-foundry `mads` loader (docs/bring-your-own-mds.md).

The datasets are written as llm-foundry writes them (Streaming's MDSWriter, zstd): `text` (str),
`tokens` (ndarray:int32, its newer converters) and legacy `tokens` (bytes of an int64 array, its
old concatenating converter; and of a uint16 one, read with `token_encoding_type`). Each token
sample is a 16-id window of documents encoded with a real BPE tokenizer, each followed by EOS.
Real labelling, real Trainers with the console, a few batches each.
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
import yaml
from streaming import MDSWriter

from streaming_mads.collate import TextCollator, TokenCollator
from streaming_mads.labels import StreamLabels
from streaming_mads.mds_formats import TOKEN_ENCODING_TYPES, SampleDecoder, SampleFormatError
from streaming_mads.run.cli import main
from streaming_mads.run.foundry import build_mads_dataloader
from streaming_mads.run.loader import ConfigError, build_dataloader
from streaming_mads.run.train import build_trainer
from streaming_mads.tokenizer import load_tokenizer, train_bpe

# llm-foundry records no tokenizer beside its data: the run warns that it cannot compare them.
pytestmark = pytest.mark.filterwarnings('ignore:MADS could not check the tokenizer')

SEQ, B, VOCAB = 16, 4, 300
WORDS = ('the data model loader stream shard agent weight sample token batch epoch reference '
         'quality domain topic console pool').split()
#: name -> (MDS columns, how a window of ids is stored, token_encoding_type to read it)
FORMATS = {
    'text': ({'text': 'str'}, None, None),
    'tokens': ({'tokens': 'ndarray:int32'}, lambda ids: ids.astype(np.int32), None),
    'bytes-int64': ({'tokens': 'bytes'}, lambda ids: ids.astype(np.int64).tobytes(), None),
    'bytes-uint16': ({'tokens': 'bytes'}, lambda ids: ids.astype(np.uint16).tobytes(), 'uint16'),
}


def _docs(rng: np.random.Generator, n: int) -> list[str]:
    return [' '.join(rng.choice(WORDS, rng.integers(6, 30))) for _ in range(n)]


def _write(out: str, fmt: str, docs: list[str], tok) -> list[tuple[int, ...]]:
    """Write ``docs`` in format ``fmt`` as llm-foundry does; the token ids of each sample."""
    columns, store, _ = FORMATS[fmt]
    if store is None:
        samples = [{'text': d} for d in docs]
        expected = [np.append(ids, tok.eos_id)[:SEQ] for ids in tok.encode_batch(docs)]
    else:  # Documents, each followed by EOS, concatenated and cut into SEQ-id windows.
        stream = np.concatenate([np.append(ids, tok.eos_id) for ids in tok.encode_batch(docs)])
        expected = [stream[i:i + SEQ] for i in range(0, len(stream) - SEQ + 1, SEQ)]
        samples = [{'tokens': store(ids)} for ids in expected]
    with MDSWriter(out=out, columns=columns, compression='zstd', size_limit=1 << 11) as w:
        for sample in samples:
            w.write(sample)
    return [tuple(int(i) for i in ids) for ids in expected]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The tokenizer (a saved BPE directory) and each format's training and reference sets,
    labelled with `mads label` (quality)."""
    root = str(tmp_path_factory.mktemp('formats'))
    rng = np.random.default_rng(0)
    train_docs, ref_docs = _docs(rng, 120), _docs(rng, 24)
    tok_dir = os.path.join(root, 'tokenizer')
    train_bpe(train_docs + ref_docs, vocab_size=VOCAB).save(tok_dir)
    tok = load_tokenizer(tok_dir)
    out = {'tokenizer': tok_dir, 'docs': train_docs}
    for fmt, (_, _, encoding) in FORMATS.items():
        path = os.path.join(root, fmt)
        expected = _write(path, fmt, train_docs, tok)
        _write(os.path.join(root, f'{fmt}-ref'), fmt, ref_docs, tok)
        args = ['label', path, '--columns', 'quality', '--workers', '1', '--no-progress']
        args += ['--tokenizer', tok_dir] if fmt != 'text' else []
        args += ['--token-encoding-type', encoding] if encoding else []
        assert main(args) == 0
        out[fmt] = (path, set(expected))
    return out


def _rows(batch: dict) -> list[tuple[int, ...]]:
    """Each batch row's ids without its padding."""
    return [tuple(int(i) for i in ids[mask.bool()])
            for ids, mask in zip(batch['input_ids'], batch['attention_mask'])]


def _config(data, fmt: str, **dataset) -> dict:
    path = data[fmt][0]
    encoding = FORMATS[fmt][2]
    return {'max_seq_len': SEQ, 'global_train_batch_size': B, 'max_duration': '3ba',
            'model': {'preset': 'tiny', 'n_embd': 32, 'vocab_size': VOCAB},
            'tokenizer': {'name': data['tokenizer']},
            'train_loader': {'name': 'mads', 'dataset': {
                'local': path, 'pool_ratio': 2, 'agents': ['quality'],
                **({'token_encoding_type': encoding} if encoding else {}), **dataset}},
            'algorithms': {'mads_console': {'reference': f'{path}-ref', 'update_interval': 2,
                                            'probe_size': 8, 'reference_size': 8}},
            'progress_bar': False, 'log_to_console': False}


def test_labels_of_every_token_format_agree(data):
    """`mads label` reads the same ids from an ndarray and from int64 and uint16 bytes, so it
    labels them alike (quality is scored on the text the ids decode to)."""
    arrays = []
    for fmt in ('tokens', 'bytes-int64', 'bytes-uint16'):
        path, expected = data[fmt]
        arrays.append(StreamLabels(path, len(expected), fmt).array('quality'))
    assert len(arrays[0]) == len(data['tokens'][1]) > 20
    for other in arrays[1:]:
        np.testing.assert_array_equal(arrays[0], other)
    text = StreamLabels(data['text'][0], 120, 'text').array('quality')
    assert len(text) == 120 and np.ptp(text) > 0


@pytest.mark.parametrize('fmt', list(FORMATS))
def test_mads_train_trains_every_format_with_the_console(data, fmt):
    """The loader `mads train` builds yields the written ids (text: the tokenizer's encoding,
    cut to max_seq_len), and the run trains with the console reading its reference set in the
    same format."""
    path, expected = data[fmt]
    trainer = build_trainer(_config(data, fmt))
    loader = trainer.state.train_dataloader
    assert isinstance(loader.collate_fn, TextCollator) == (fmt == 'text')
    batch = next(iter(loader))
    assert batch['input_ids'].shape[0] == B
    assert set(_rows(batch)) <= expected
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    assert trainer.state.algorithms[0].console.latest >= 1  # The console updated the weights.
    trainer.close()
    del trainer, loader
    gc.collect()


def test_mads_train_cli_on_text_with_a_jsonl_reference(data, tmp_path, monkeypatch):
    """`mads train` on llm-foundry text MDS with a jsonl reference: the reference stays text and
    is tokenised like the training samples (it used to fail with KeyError: 'tokens')."""
    monkeypatch.chdir(tmp_path)  # `mads train` writes its run folder where it runs.
    ref = tmp_path / 'reference.jsonl'
    ref.write_text('\n'.join(json.dumps({'text': d})
                             for d in _docs(np.random.default_rng(5), 12)))
    cfg = _config(data, 'text')
    cfg['algorithms']['mads_console']['reference'] = str(ref)
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg))
    assert main(['train', str(path), 'max_duration=2ba']) == 0


@pytest.mark.parametrize('fmt', ['bytes-uint16', 'text'])
def test_python_api_trains_every_format(data, fmt):
    """MADSDataset + TokenCollator (or TextCollator with a transformers tokenizer, as
    llm-foundry passes) + AgentConsole in a Composer Trainer."""
    from composer import Trainer
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from streaming_mads import MADSDataset
    from streaming_mads.algorithms import AgentConsole
    from streaming_mads.models import build_causal_lm

    path, expected = data[fmt]
    if fmt == 'text':  # llm-foundry's call: the tokenizer's own special tokens and truncation.
        hf = AutoTokenizer.from_pretrained(data['tokenizer'])
        collate = TextCollator(hf, SEQ)
        expected = {tuple(ids) for ids in hf(data['docs'], truncation=True,
                                             max_length=SEQ)['input_ids']}
        ds = MADSDataset(local=path, batch_size=B, pool_ratio=2)
    else:
        collate = TokenCollator(max_seq_len=SEQ, token_encoding_type='uint16')
        ds = MADSDataset(local=path, batch_size=B, pool_ratio=2, token_encoding_type='uint16')
    loader = DataLoader(ds, batch_size=B, collate_fn=collate)
    assert set(_rows(next(iter(loader)))) <= expected
    model = build_causal_lm(VOCAB, SEQ, 'tiny', n_embd=32)
    console = AgentConsole(reference=f'{path}-ref', update_interval=2, probe_size=8,
                           reference_size=8)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='3ba', device='cpu',
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                      algorithms=[console], progress_bar=False, log_to_console=False)
    trainer.fit()
    assert console.console.latest >= 1
    trainer.close()
    del trainer, loader, ds
    gc.collect()


def test_foundry_loader_reads_legacy_bytes(data):
    """The llm-foundry `mads` loader with `dataset.token_encoding_type` (its key): uint16 bytes
    read as uint16 give the written ids."""
    path, expected = data['bytes-uint16']
    spec = build_mads_dataloader(None, B, dataset={'local': path, 'pool_ratio': 2,
                                                   'agents': ['quality'], 'max_seq_len': SEQ,
                                                   'token_encoding_type': 'uint16'})
    rows = [row for batch in list(spec.dataloader)[:3] for row in _rows(batch)]
    assert len(rows) == 3 * B and set(rows) <= expected
    del spec
    gc.collect()


def test_token_encoding_type_is_checked_at_construction(data, capsys):
    from streaming_mads import MADSDataset
    path = data['bytes-int64'][0]
    listed = ', '.join(TOKEN_ENCODING_TYPES)
    with pytest.raises(ConfigError, match=f"train_loader.dataset.token_encoding_type='float32' is "
                                          f"not a token dtype: use one of {listed}"):
        build_dataloader({'dataset': {'local': path, 'token_encoding_type': 'float32',
                                      'pool_ratio': 1}}, None, B)
    with pytest.raises(ValueError, match="MADSDataset token_encoding_type='int128'"):
        MADSDataset(local=path, batch_size=B, token_encoding_type='int128')
    assert main(['label', path, '--columns', 'quality', '--token-encoding-type', 'int4']) == 2
    assert f"--token-encoding-type='int4' is not a token dtype: use one of {listed}" in \
        capsys.readouterr().err
    gc.collect()


def test_bytes_that_are_not_whole_ids_name_the_sample_and_the_setting(data, tmp_path, capsys):
    """Odd-length uint16 ids (30 bytes) read as int64: the dataset names the sample and its
    shard, the plain loader and `mads label` name their setting."""
    from streaming_mads import MADSDataset
    path = str(tmp_path / 'odd')
    with MDSWriter(out=path, columns={'tokens': 'bytes'}, compression='zstd') as w:
        for i in range(8):
            w.write({'tokens': (np.arange(15) + i).astype(np.uint16).tobytes()})
    ds = MADSDataset(local=path, batch_size=2, agents=[])
    with pytest.raises(SampleFormatError, match=r"sample 0 \(shard shard.00000.mds of stream "
                                                r".*odd\) holds 30 bytes in 'tokens', not a whole "
                                                r"number of int64 token ids \(8 bytes each\): set "
                                                r"MADSDataset token_encoding_type"):
        ds[0]
    assert np.array_equal(MADSDataset(local=path, batch_size=2, agents=[],
                                      token_encoding_type='uint16')[3]['tokens'],
                          np.arange(15) + 3)
    spec = build_dataloader({'name': 'streaming', 'dataset': {'local': path}}, None, 2,
                            where='eval_loaders[0] (odd)')
    with pytest.raises(SampleFormatError, match=r"a sample of eval_loaders\[0\] \(odd\)\.dataset "
                                                r"holds 30 bytes .* set eval_loaders\[0\] \(odd\)"
                                                r"\.dataset\.token_encoding_type"):
        next(iter(spec.dataloader))
    assert main(['label', path, '--columns', 'quality', '--tokenizer', data['tokenizer'],
                 '--workers', '1', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert 'sample 0 of shard shard.00000.mds: it holds 30 bytes' in err
    assert 'set --token-encoding-type' in err
    del ds, spec
    gc.collect()


def test_columns_of_no_accepted_format_are_listed(tmp_path, capsys):
    path = str(tmp_path / 'other')
    with MDSWriter(out=path, columns={'body': 'str', 'n': 'int'}, compression='zstd') as w:
        for i in range(8):
            w.write({'body': f'doc {i}', 'n': i})
    formats = r"'text' \(str.*'tokens' \(ndarray.*legacy 'tokens' \(bytes"
    with pytest.raises(ConfigError, match=rf"train_loader.dataset: stream .*other holds none of "
                                          rf"the accepted sample formats \({formats}.*\): its "
                                          rf"columns are body \(str\), n \(int\)\. Set "
                                          rf"train_loader.dataset.tokens_column or text_column"):
        build_dataloader({'dataset': {'local': path, 'pool_ratio': 1, 'agents': []}}, None, 2)
    spec = build_dataloader({'dataset': {'local': path, 'pool_ratio': 1, 'agents': [],
                                         'text_column': 'body'}}, load_tokenizer('bytes'), 2)
    assert _rows(next(iter(spec.dataloader)))[0] == tuple(b'doc 0') + (256,)
    assert main(['label', path, '--columns', 'quality', '--workers', '1']) == 2
    assert 'columns are body (str), n (int)' in capsys.readouterr().err
    with pytest.raises(SampleFormatError, match=r"has neither 'tokens' nor 'text' \(its columns: "
                                                r"body, n\); accepted: 'text'"):
        TokenCollator()([{'body': 'x', 'n': 1}])
    del spec
    gc.collect()


def test_text_without_a_tokenizer_names_the_key(data):
    cfg = _config(data, 'text')
    del cfg['tokenizer']  # llm-foundry text MDS records no tokenizer beside it.
    with pytest.raises(ConfigError, match=r"train_loader.dataset: the samples hold text \('text'"
                                          r"\), and no tokenizer .*set tokenizer.name"):
        build_trainer(cfg)
    with pytest.raises(SampleFormatError, match="holds text in 'text', and tokenising it needs a "
                                                "tokenizer: set tokenizer.name"):
        SampleDecoder()([{'text': 'a'}])
    gc.collect()
