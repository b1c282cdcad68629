"""Tokenizer and vocabulary mismatches are refused before training, with both sides named.

Real `mads convert` outputs (BPE tokenizers trained on different text, the byte tokenizer, the
training tokenizer saved again in `transformers` format), real `mads train` configs and real
Composer runs; a mismatch must stop the run before its first batch.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from streaming import MDSWriter

from streaming_mads.checks import TokenizerMismatchError
from streaming_mads.convert.convert import convert
from streaming_mads.convert_record import read_convert_info
from streaming_mads.labels import score, write_labels
from streaming_mads.run.train import ConfigError, build_trainer

SEQ = 16
WORDS_A = 'the data model loader stream shard agent weight sample token batch epoch'.split()
WORDS_B = 'zebra quartz fjord glyph vex nymph jukebox wyvern kiwi oxbow sphinx lynx'.split()


def _text(path: str, words: list[str], seed: int, docs: int = 60) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'docs.jsonl'), 'w') as f:
        for _ in range(docs):
            f.write('{"text": "%s"}\n' % ' '.join(rng.choice(words, 40)))
    return path


def _convert(out: str, text: str, tokenizer: str) -> str:
    convert([f'web={text}'], out, layout='single', seq_len=SEQ, tokenizer=tokenizer,
            vocab_size=300, progress=False)
    return out


def convert_samples(out: str) -> int:
    return sum(s['samples'] for s in read_convert_info(out)['streams'])


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    """Training data (BPE A), references: A saved as `transformers`, BPE B, bytes."""
    from transformers import PreTrainedTokenizerFast
    root = str(tmp_path_factory.mktemp('tok'))
    data = _convert(os.path.join(root, 'data'), _text(os.path.join(root, 'a'), WORDS_A, 0), 'train')
    n = convert_samples(data)
    write_labels(data, {'quality': score(np.random.default_rng(0).uniform(0, 5, n))})
    hf_dir = os.path.join(root, 'hf-tokenizer')
    PreTrainedTokenizerFast(tokenizer_file=os.path.join(data, 'tokenizer', 'tokenizer.json'),
                            eos_token='<|endoftext|>').save_pretrained(hf_dir)
    a2 = _text(os.path.join(root, 'a2'), WORDS_A, 1, docs=20)
    return {'data': data,
            'same': _convert(os.path.join(root, 'ref_same'), a2, hf_dir),
            'other': _convert(os.path.join(root, 'ref_other'),
                              _text(os.path.join(root, 'b'), WORDS_B, 2), 'train'),
            'bytes': _convert(os.path.join(root, 'ref_bytes'), a2, 'bytes')}


def _cfg(sets, reference: str, **extra) -> dict:
    cfg = {
        'max_seq_len': SEQ, 'global_train_batch_size': 4, 'max_duration': '2ba',
        'model': {'preset': 'tiny', 'n_embd': 32},
        'train_loader': {'name': 'mads', 'dataset': {'local': sets['data'], 'pool_ratio': 2,
                                                     'agents': ['quality']}},
        'eval_loaders': [{'label': 'heldout', 'dataset': {'local': sets['same']}}],
        'eval_interval': '2ba',
        'algorithms': {'mads_console': {'reference': reference, 'update_interval': 2,
                                        'probe_size': 4, 'reference_size': 4}},
    }
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def test_same_tokenizer_in_another_format_trains(sets):
    trainer = build_trainer(_cfg(sets, sets['same']))
    emb = trainer.state.model.model.get_input_embeddings()
    assert emb.num_embeddings == 300  # From the training data's mads_convert.json.
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()


@pytest.mark.parametrize('which', ['other', 'bytes'])
def test_mads_train_refuses_a_reference_of_another_tokenizer(sets, which):
    with pytest.raises(TokenizerMismatchError) as err:
        build_trainer(_cfg(sets, sets[which]))
    msg = str(err.value)
    assert 'reference' in msg and 'training data' in msg
    assert os.path.join(sets['data'], 'tokenizer') in msg  # Both tokenizers are named.
    assert sets[which] in msg and 'mads convert --tokenizer' in msg


def test_mads_train_refuses_an_eval_set_of_another_tokenizer(sets):
    cfg = _cfg(sets, sets['same'], eval_loaders=[{'label': 'heldout',
                                                  'dataset': {'local': sets['other']}}])
    with pytest.raises(TokenizerMismatchError, match="eval set 'heldout'.*ref_other"):
        build_trainer(cfg)


def test_mads_train_refuses_a_model_smaller_than_the_tokenizer(sets):
    cfg = _cfg(sets, sets['same'])
    cfg['model']['vocab_size'] = 200
    with pytest.raises(TokenizerMismatchError, match='training data.*only 200 ids.*at least 300'):
        build_trainer(cfg)


def test_unknown_model_key_is_an_error(sets):
    cfg = _cfg(sets, sets['same'])
    cfg['model']['n_layr'] = 3
    with pytest.raises(ConfigError, match="model.n_layr .*did you mean 'n_layer'"):
        build_trainer(cfg)


def test_unknown_console_setting_names_the_closest():
    from streaming_mads.algorithms import AgentConsole
    with pytest.raises(ValueError, match="no setting 'lr_thta': did you mean 'lr_theta'"):
        AgentConsole(reference='unused', lr_thta=2.0)
    with pytest.raises(ValueError, match="no setting 'zzz'.*lr_memory"):
        AgentConsole(reference='unused', zzz=1)
    assert AgentConsole(reference='unused', lr_theta=2.0).config.lr_theta == 2.0


def _python_trainer(data: str, reference: str):
    """A Trainer built in Python (no `mads train`): only the console's FIT_START check runs."""
    import torch
    from composer import Trainer
    from torch.utils.data import DataLoader

    from streaming_mads.algorithms import AgentConsole
    from streaming_mads import MADSDataset
    from streaming_mads.collate import TokenCollator
    from streaming_mads.models import build_causal_lm
    ds = MADSDataset(local=data, batch_size=4, pool_ratio=2, agents=['quality'])
    model = build_causal_lm(300, SEQ, 'tiny', seed=0, n_embd=32)
    algo = AgentConsole(reference=reference, update_interval=2, probe_size=4, reference_size=4)
    return Trainer(model=model, train_dataloader=DataLoader(ds, batch_size=4,
                                                            collate_fn=TokenCollator()),
                   max_duration='2ba', optimizers=torch.optim.AdamW(model.parameters()),
                   algorithms=[algo], device='cpu', progress_bar=False, log_to_console=False)


def test_fit_start_refuses_another_tokenizer_before_the_first_batch(sets):
    trainer = _python_trainer(sets['data'], sets['other'])
    with pytest.raises(TokenizerMismatchError, match='reference.*training data'):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0
    trainer.close()


def test_fit_start_refuses_reference_ids_past_the_model(sets, tmp_path):
    """A reference without mads_convert.json: its token ids themselves are checked."""
    ref = os.path.join(tmp_path, 'ref')
    with MDSWriter(out=ref, columns={'tokens': 'ndarray:int32'}) as w:
        for i in range(8):
            w.write({'tokens': (np.arange(SEQ, dtype=np.int32) + 290 + i)})
    trainer = _python_trainer(sets['data'], ref)
    with pytest.raises(TokenizerMismatchError, match=r'reference set holds token ids up to 312.*300'):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0
    trainer.close()
