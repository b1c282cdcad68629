"""``mads convert``: text inputs to MDS shards."""

import json
import os

import numpy as np
import pytest
from files import file_tree

from streaming_mads.run.cli import main
from streaming_mads.convert.convert import ConvertError, Input, convert, parse_input
from streaming_mads.convert_record import read_convert_info
from streaming_mads.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_from_record

EOS = 256  # ByteTokenizer.


def write_corpus(root):
    """A tiny three-domain corpus: a jsonl file, a directory of text files, one text file."""
    os.makedirs(root / 'web' / 'sub', exist_ok=True)
    wiki = [f'Article {i}. The river runs through the valley and the farmers grow wheat there. '
            f'Its history goes back {i} centuries, as the records of the old town show.'
            for i in range(12)]
    with open(root / 'wiki.jsonl', 'w') as f:
        for i, text in enumerate(wiki):
            f.write(json.dumps({'text': text, 'id': i, 'src': 'wiki' if i % 2 else 'books'}) + '\n')
        f.write('\n')  # Blank lines are skipped.
    web = [f'Home | About | Contact\nPage {i}: cheap deals, click here to subscribe!' for i in range(6)]
    for i, text in enumerate(web):
        (root / 'web' / ('sub' if i % 2 else '') / f'page{i}.txt').write_text(text)
    (root / 'web' / 'ignored.bin').write_bytes(b'\x00\x01')
    code = '\n\n'.join(f'def f{i}(x):\n    return x * {i} + 1' for i in range(10))
    (root / 'code.txt').write_text(code)
    return {'wiki': wiki, 'web': web, 'code': code}


def _stream_tokens(path):
    from streaming import StreamingDataset
    ds = StreamingDataset(local=str(path), batch_size=1, shuffle=False)
    return [ds[i] for i in range(len(ds))]


def test_convert_tokens_streams_layout(tmp_path):
    docs = write_corpus(tmp_path)
    out = tmp_path / 'out'
    summary = convert(['wiki=' + str(tmp_path / 'wiki.jsonl'), str(tmp_path / 'web'),
                       Input(str(tmp_path / 'code.txt'), 'code')], str(out), seq_len=64,
                      size_limit=2000, doc_split='paragraph', progress=False)
    assert [s['name'] for s in summary.streams] == ['code', 'web', 'wiki']
    assert summary.domains['wiki'].documents == 12
    assert summary.domains['web'].documents == 6
    assert summary.domains['code'].documents == 10
    info = read_convert_info(str(out))
    assert info['columns'] == {'tokens': 'ndarray:uint16:64'}
    assert info['tokenizer']['kind'] == 'bytes'
    for name in ('code', 'web', 'wiki'):
        stats = summary.domains[name]
        index = json.load(open(out / name / 'index.json'))
        assert all(s['compression'] == 'zstd' for s in index['shards'])
        samples = _stream_tokens(out / name)
        assert len(samples) == stats.samples == sum(s['samples'] for s in index['shards'])
        assert stats.tokens == 64 * stats.samples
        tokens = np.concatenate([s['tokens'] for s in samples])
        assert tokens.dtype == np.uint16
        # Concatenate-and-chunk: documents in order, each followed by EOS, the tail dropped.
        pieces = docs[name] if name != 'code' else docs['code'].split('\n\n')
        full = np.concatenate([np.append(np.frombuffer(p.encode(), np.uint8), EOS) for p in pieces])
        if name == 'web':  # Directory order is sorted: page0, page2, page4, then sub/.
            order = [0, 2, 4, 1, 3, 5]
            full = np.concatenate([np.append(np.frombuffer(docs['web'][i].encode(), np.uint8), EOS)
                                   for i in order])
        assert np.array_equal(tokens, full[:len(tokens)])
        assert stats.dropped_tokens == len(full) - len(tokens) < 64
    assert len(json.load(open(out / 'wiki' / 'index.json'))['shards']) > 1  # size_limit applies
    assert 'total' in summary.table()


def test_convert_is_deterministic_and_needs_overwrite(tmp_path):
    write_corpus(tmp_path)
    inputs = [str(tmp_path / 'wiki.jsonl'), str(tmp_path / 'web')]
    kw = dict(seq_len=32, tokenizer='train', vocab_size=300, size_limit=1500, progress=False)
    convert(inputs, str(tmp_path / 'a'), **kw)
    convert(inputs, str(tmp_path / 'b'), **kw)
    first = file_tree(tmp_path / 'a')
    assert first == file_tree(tmp_path / 'b')
    assert 'tokenizer/tokenizer.json' in first
    with pytest.raises(ConvertError, match='--overwrite'):
        convert(inputs, str(tmp_path / 'a'), **kw)
    (tmp_path / 'a' / 'wiki' / 'extra').write_text('x')
    convert(inputs, str(tmp_path / 'a'), overwrite=True, **kw)
    assert file_tree(tmp_path / 'a') == first
    (tmp_path / 'notmine').mkdir()
    (tmp_path / 'notmine' / 'precious.txt').write_text('keep me')
    with pytest.raises(ConvertError, match='Refusing'):
        convert(inputs, str(tmp_path / 'notmine'), overwrite=True, **kw)
    assert (tmp_path / 'notmine' / 'precious.txt').exists()


def test_convert_trained_bpe_decodes_back(tmp_path):
    docs = write_corpus(tmp_path)
    out = tmp_path / 'out'
    convert([str(tmp_path / 'wiki.jsonl')], str(out), seq_len=16, tokenizer='train', vocab_size=400,
            progress=False)
    info = read_convert_info(str(out))
    tok = tokenizer_from_record(info['tokenizer'], str(out))
    assert tok.vocab_size <= 400 and info['columns']['tokens'] == 'ndarray:uint16:16'
    tokens = np.concatenate([s['tokens'] for s in _stream_tokens(out / 'wiki')])
    text = tok.decode_segments(tokens)
    assert text[0] == docs['wiki'][0] and text[1] == docs['wiki'][1]
    assert load_tokenizer(str(out / 'tokenizer')).eos_id == tok.eos_id


def test_trained_tokenizer_loads_with_transformers(tmp_path):
    """Other tools (transformers, llm-foundry's `tokenizer.name`) load `OUT/tokenizer` and get
    exactly the ids stored in the shards, and the text back."""
    from transformers import AutoTokenizer
    docs = write_corpus(tmp_path)
    out = tmp_path / 'out'
    convert([str(tmp_path / 'wiki.jsonl')], str(out), seq_len=16, tokenizer='train', vocab_size=400,
            progress=False)
    info = read_convert_info(str(out))
    assert {'tokenizer.json', 'tokenizer_config.json'} <= set(info['tokenizer']['files'])
    hf = AutoTokenizer.from_pretrained(str(out / 'tokenizer'), local_files_only=True)
    assert hf.eos_token_id == info['tokenizer']['eos_id']
    expected = np.concatenate([hf(d, add_special_tokens=False)['input_ids'] + [hf.eos_token_id]
                               for d in docs['wiki']])
    stored = np.concatenate([s['tokens'] for s in _stream_tokens(out / 'wiki')])
    assert len(stored) > 100 and np.array_equal(stored, expected[:len(stored)])
    first = expected[:list(expected).index(hf.eos_token_id)].tolist()
    assert hf.decode(first) == docs['wiki'][0]


def test_convert_text_mode_single_layout(tmp_path):
    docs = write_corpus(tmp_path)
    out = tmp_path / 'out'
    summary = convert([str(tmp_path / 'wiki.jsonl'), 'code=' + str(tmp_path / 'code.txt')], str(out),
                      mode='text', layout='single', meta_fields=['id'], progress=False)
    assert [s['path'] for s in summary.streams] == ['']
    index = json.load(open(out / 'index.json'))
    assert index['shards'][0]['column_names'] == sorted(['text', 'id', 'domain'])
    samples = _stream_tokens(out)
    assert [s['text'] for s in samples] == docs['wiki'] + [docs['code']]
    assert [s['domain'] for s in samples] == ['wiki'] * 12 + ['code']
    assert samples[3]['id'] == '3' and samples[-1]['id'] == ''
    assert summary.domains['wiki'].tokens == sum(len(d.encode()) for d in docs['wiki'])
    # Domains from a jsonl field.
    summary = convert([str(tmp_path / 'wiki.jsonl')], str(tmp_path / 'out2'), mode='text',
                      domain_field='src', progress=False)
    assert sorted(summary.domains) == ['books', 'wiki']
    assert summary.domains['books'].documents == 6


def test_parse_input(tmp_path):
    assert parse_input('a=b/c.jsonl') == Input('b/c.jsonl', 'a')
    weird = tmp_path / 'x=y.txt'
    weird.write_text('hi')
    assert parse_input(str(weird)) == Input(str(weird))


def _cli_error(capsys, *argv):
    assert main(['convert', *argv, '--no-progress']) == 2
    return capsys.readouterr().err


def test_convert_bad_inputs(tmp_path, capsys):
    write_corpus(tmp_path)
    out = str(tmp_path / 'out')
    err = _cli_error(capsys, str(tmp_path / 'missing.jsonl'), '-o', out)
    assert 'missing.jsonl does not exist' in err
    (tmp_path / 'empty.txt').write_text('')
    assert 'is empty' in _cli_error(capsys, str(tmp_path / 'empty.txt'), '-o', out)
    (tmp_path / 'blank.jsonl').write_text('\n\n{"text": "   "}\n')
    assert 'is empty (no non-blank document)' in _cli_error(capsys, str(tmp_path / 'blank.jsonl'),
                                                             '-o', out)
    (tmp_path / 'emptydir').mkdir()
    assert 'no files matching --include' in _cli_error(capsys, str(tmp_path / 'emptydir'), '-o', out)
    (tmp_path / 'notext.jsonl').write_text('{"text": "ok"}\n{"body": "x", "id": 1}\n')
    err = _cli_error(capsys, str(tmp_path / 'notext.jsonl'), '-o', out)
    assert "notext.jsonl:2: no field 'text' (fields: body, id)" in err and '--text-field' in err
    (tmp_path / 'badjson.jsonl').write_text('{"text": "ok"}\n{oops\n')
    assert 'badjson.jsonl:2: invalid JSON' in _cli_error(capsys, str(tmp_path / 'badjson.jsonl'),
                                                         '-o', out)
    (tmp_path / 'latin1.txt').write_bytes('caf\u00e9 cr\u00e8me br\u00fbl\u00e9e'.encode('latin-1'))
    err = _cli_error(capsys, str(tmp_path / 'latin1.txt'), '-o', out)
    assert 'latin1.txt: not valid UTF-8' in err and '--encoding-errors replace' in err
    (tmp_path / 'latin1.jsonl').write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    err = _cli_error(capsys, str(tmp_path / 'latin1.jsonl'), '-o', out)
    assert 'latin1.jsonl:2: not valid UTF-8 (byte 0xe9' in err
    err = _cli_error(capsys, str(tmp_path / 'wiki.jsonl'), '-o', out, '--seq-len', '100000')
    assert 'fewer than one sample of --seq-len 100000' in err
    err = _cli_error(capsys, str(tmp_path / 'wiki.jsonl'), '-o', out, '--tokenizer', 'gpt2')
    assert "Tokenizer 'gpt2' not found" in err
    err = _cli_error(capsys, 'bad name=' + str(tmp_path / 'wiki.jsonl'), '-o', out)
    assert "Domain 'bad name'" in err
    assert not os.path.exists(out) and not os.path.exists(out + '.mads-tmp')
    # The replace policy converts the same file.
    assert main(['convert', str(tmp_path / 'latin1.txt'), '-o', out, '--encoding-errors', 'replace',
                 '--seq-len', '4', '--no-progress']) == 0
    assert 'latin1' in capsys.readouterr().out


def test_bytes_tokenizer_segments():
    tok = ByteTokenizer()
    ids = np.concatenate([tok.encode_batch(['ab'])[0], [EOS], tok.encode_batch(['c\u00e9'])[0], [EOS]])
    assert tok.decode_segments(ids) == ['ab', 'c\u00e9']
    assert tok.decode_segments(np.asarray([EOS, EOS])) == ['']


def test_tokenizer_file_padding_is_ignored(tmp_path):
    """A tokenizer.json saved with padding/truncation (as sentence-embedding ones are) must still
    encode whole documents."""
    from streaming_mads.tokenizer import train_bpe
    tok = train_bpe(['the cat sat on the mat'] * 20, vocab_size=300)
    tok.tok.enable_padding(length=64)
    tok.tok.enable_truncation(max_length=4)
    path = tmp_path / 'tokenizer.json'
    path.write_text(tok.tok.to_str())
    loaded = load_tokenizer(str(path))
    text = 'the cat sat on the mat and the dog sat too'
    ids = loaded.encode_batch([text])[0]
    assert 4 < len(ids) < 64
    assert loaded.decode_batch([ids]) == [text]


def _parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), str(path))
    return str(path)


def test_parquet_inputs_read_fields_like_jsonl(tmp_path):
    """A Parquet file is read with pyarrow, one document per row, its columns as jsonl fields
    (it used to be decoded as latin-1 text, or read as one binary "document")."""
    texts = [f'Row {i}: the river runs through the valley.' for i in range(6)]
    data = tmp_path / 'data'
    data.mkdir()
    _parquet(data / 'part-0.parquet', body=texts[:4], id=[0, 1, 2, 3], src=['a', 'b', 'a', 'b'])
    _parquet(data / 'part-1.parquet', body=texts[4:], id=[4, None], src=['a', 'b'])
    summary = convert([str(data)], str(tmp_path / 'out'), mode='text', layout='single',
                      text_field='body', meta_fields=['id'], domain_field='src', progress=False)
    assert {d: s.documents for d, s in summary.domains.items()} == {'a': 3, 'b': 3}
    samples = _stream_tokens(tmp_path / 'out')
    assert [s['text'] for s in samples] == texts
    assert [s['id'] for s in samples] == ['0', '1', '2', '3', '4', '']
    assert [s['domain'] for s in samples] == ['a', 'b', 'a', 'b', 'a', 'b']
    with pytest.raises(ConvertError, match=r"part-0.parquet: no column 'text' \(columns: body, id, "
                                           r"src\).*--text-field"):
        convert([str(data)], str(tmp_path / 'out2'), mode='text', progress=False)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    import sys
    path = _parquet(tmp_path / 'd.parquet', text=['some text'])
    monkeypatch.setitem(sys.modules, 'pyarrow', None)
    monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)
    with pytest.raises(ConvertError, match=r"pip install 'streaming-mads\[parquet\]'"):
        convert([path], str(tmp_path / 'out'), mode='text', progress=False)


@pytest.mark.parametrize('name,content,what', [
    ('table.txt', None, 'a Parquet file'),  # A Parquet file under another name.
    ('archive.txt', b'PK\x03\x04\x14\x00\x00\x00 docs', 'a zip archive'),
    ('blob.md', b'header\x00\x01\x02 more', 'a binary file: NUL byte at offset 6'),
    ('packed.jsonl', b'\x1f\x8b\x08\x00 not named .gz', 'gzip-compressed'),
    ('wide.txt', 'caf\u00e9'.encode('utf-16'), 'UTF-16 text'),
])
def test_binary_files_are_never_read_as_text(tmp_path, name, content, what):
    path = tmp_path / name
    if content is None:
        _parquet(path, text=['a document'] * 50)
    else:
        path.write_bytes(content)
    for errors in ('strict', 'replace'):  # Replacing bytes made the binary one "document".
        with pytest.raises(ConvertError) as err:
            convert([str(path)], str(tmp_path / 'out'), mode='text', encoding_errors=errors,
                    progress=False)
        message = str(err.value)
        assert f'{path} is not text ({what}' in message and 'Parquet (.parquet)' in message


def test_skip_bad_counts_bad_lines_and_empty_files(tmp_path, capsys):
    good = [f'Document {i} about the valley and its river.' for i in range(4)]
    (tmp_path / 'mixed.jsonl').write_text('\n'.join([
        json.dumps({'text': good[0]}), '{oops', json.dumps({'body': 'no text'}), json.dumps(['x']),
        json.dumps({'text': good[1]}), '{"text": 3}', json.dumps({'text': good[2]}), '{bad again',
    ]) + '\n')
    (tmp_path / 'more').mkdir()
    (tmp_path / 'more' / 'ok.txt').write_text(good[3])
    (tmp_path / 'more' / 'blank.txt').write_text('  \n')
    (tmp_path / 'empty.jsonl').write_text('')
    inputs = [str(tmp_path / 'mixed.jsonl'), str(tmp_path / 'more'), str(tmp_path / 'empty.jsonl')]
    out = str(tmp_path / 'out')
    # Without --skip-bad the first bad line stops the run, naming the file, line and the flag.
    err = _cli_error(capsys, *inputs[:2], '-o', out, '--mode', 'text')
    assert 'mixed.jsonl:2: invalid JSON' in err and '--skip-bad' in err
    err = _cli_error(capsys, *inputs, '-o', out, '--mode', 'text')
    assert 'empty.jsonl is empty' in err and '--skip-bad' in err
    assert main(['convert', *inputs, '-o', out, '--mode', 'text', '--layout', 'single',
                 '--skip-bad', '--no-progress']) == 0
    printed = capsys.readouterr().out
    assert [s['text'] for s in _stream_tokens(out)] == good
    assert '5 bad line(s)' in printed and '2 invalid JSON (first at ' in printed
    assert "no field 'text' (first at " in printed and 'mixed.jsonl:3)' in printed
    assert '2 empty file(s)' in printed and 'blank.txt' in printed and 'empty.jsonl' in printed
    summary = convert(inputs, str(tmp_path / 'api'), mode='text', skip_bad=True, progress=False)
    assert summary.read.skipped == {'invalid JSON': 2, "no field 'text'": 1,
                                    'not a JSON object': 1, "'text' not a string": 1}
    assert summary.read.empty_files == [str(tmp_path / 'more' / 'blank.txt'),
                                        str(tmp_path / 'empty.jsonl')]
    assert 'skipped 5 bad line(s)' in summary.table()
    # Nothing to convert at all is still an error.
    with pytest.raises(ConvertError, match='No document in any input'):
        convert([str(tmp_path / 'empty.jsonl')], str(tmp_path / 'none'), skip_bad=True,
                progress=False)


def test_unknown_meta_fields_are_refused(tmp_path, capsys):
    """A misspelt --meta-fields wrote an empty column."""
    write_corpus(tmp_path)
    out = str(tmp_path / 'out')
    err = _cli_error(capsys, str(tmp_path / 'wiki.jsonl'), '-o', out, '--mode', 'text',
                     '--meta-fields', 'id,source')
    assert '--meta-fields source: in no record (fields seen: id, src, text)' in err
    parquet = _parquet(tmp_path / 'p.parquet', text=['a document'], lang=['en'])
    with pytest.raises(ConvertError, match=r'--meta-fields langauge: in no record \(fields seen: '
                                           r'lang, text\)'):
        convert([parquet], out, mode='text', meta_fields=['langauge'], progress=False)
    assert not os.path.exists(out)
    convert([str(tmp_path / 'wiki.jsonl')], out, mode='text', meta_fields=['id', 'src'],
            progress=False)  # Present fields still work.
