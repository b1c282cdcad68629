"""``mads label`` / ``mads inspect``: sidecar labels of converted (and foreign) MDS datasets."""

import json
import os
import shutil

import numpy as np
import pytest

from streaming_mads.labeling import label as labeling
from streaming_mads.labeling.inspect import inspect_dataset
from streaming_mads.run.cli import main
from streaming_mads.convert.convert import convert
from streaming_mads.convert_record import read_convert_info
from streaming_mads.labeling.label import LabelingError, discover_streams, label_dataset
from streaming_mads.labels import LabelError, LabelStore, StreamLabels

SPACE = 'planet star orbit galaxy telescope comet nebula astronomer moon solar'.split()
FOOD = 'recipe oven flour butter sugar bake dough kitchen pastry sauce'.split()


VERBS = ('watched', 'found', 'described', 'measured', 'noticed', 'studied', 'named', 'loved',
         'compared', 'remembered', 'prepared', 'shared', 'mixed', 'carried', 'opened', 'kept')
FUNCTION = ('the', 'a', 'of', 'and', 'with', 'in', 'that', 'for', 'on', 'her', 'his', 'their',
            'every', 'one', 'some', 'this', 'near', 'after')


def _doc(rng, vocab, sentences=5):
    """Varied English-like prose about ``vocab`` (no repeated templates, so no n-gram spam)."""
    out = []
    for _ in range(sentences):
        words = []
        for _ in range(int(rng.integers(3, 5))):
            words += [str(rng.choice(FUNCTION)), str(rng.choice(vocab)), str(rng.choice(VERBS))]
        words.append(str(rng.choice(vocab)))
        out.append(' '.join(words).capitalize() + '.')
    return ' '.join(out)


def write_corpus(root, n=16):
    """Two prose domains on different topics (jsonl, a directory) and a boilerplate domain."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / 'science.jsonl', 'w') as f:
        for i in range(n):
            f.write(json.dumps({'text': _doc(rng, SPACE), 'kind': 'a' if i % 2 else 'b'}) + '\n')
    (root / 'cooking').mkdir(exist_ok=True)
    for i in range(n):
        (root / 'cooking' / f'{i:02d}.txt').write_text(_doc(rng, FOOD))
    with open(root / 'spam.jsonl', 'w') as f:
        for i in range(n // 2):
            f.write(json.dumps({'text': 'Home | Login | Sign up\nCLICK HERE!!! ### $$$ \u00a9 2024 '
                                f'{i}\nPrivacy Policy\nCookies'}) + '\n')
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / 'corpus')


def _convert(corpus, out, **kw):
    args = dict(seq_len=256, size_limit=1200, progress=False)
    args.update(kw)
    return convert([str(corpus / 'science.jsonl'), str(corpus / 'cooking'), str(corpus / 'spam.jsonl')],
                   str(out), **args)


def _sidecar(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if '/mads/' in full + '/' and '.work' not in full:
                out[os.path.relpath(full, path)] = open(full, 'rb').read()
    return out


def _store(streams):
    labels = [StreamLabels(s.local, s.num_samples, s.name) for s in streams]
    offsets = np.cumsum([0] + [s.num_samples for s in streams[:-1]])
    return labels, LabelStore(labels, offsets)


def test_round_trip_convert_label_open(corpus, tmp_path, capsys):
    out = tmp_path / 'out'
    summary = _convert(corpus, out)
    assert main(['label', str(out), '--topics', '3', '--no-progress']) == 0
    assert 'labelled 3 stream(s)' in capsys.readouterr().out
    streams, info, _ = discover_streams(str(out))
    assert [s.name for s in streams] == ['cooking', 'science', 'spam']
    assert all(len(s.index['shards']) > 1 for s in streams[:2])  # Several shards per stream.
    labels, store = _store(streams)
    for s, lab in zip(streams, labels):
        assert lab.num_samples == summary.domains[s.name].samples
        assert lab.columns['domain']['values'] == [s.name]
        q = np.asarray(lab.array('quality'))
        assert q.dtype == np.float32 and (q >= 0).all() and (q <= 5).all()
        assert lab.columns['topic']['values'] == ['t00', 't01', 't02']
        assert not os.path.exists(os.path.join(s.local, 'mads', '.work'))
        assert os.path.isfile(os.path.join(s.local, 'mads', 'topics', 'topics.json'))
    domain = store.info('domain')
    assert set(domain.values) == {'cooking', 'science', 'spam'}
    assert domain.counts.sum() == sum(s.num_samples for s in streams)
    # Quality: prose beats boilerplate.
    q = {s.name: float(np.mean(lab.array('quality'))) for s, lab in zip(streams, labels)}
    assert min(q['science'], q['cooking']) > q['spam'] + 1.5
    # Topics: the two prose domains fall in different clusters.
    top = {s.name: np.bincount(np.asarray(lab.array('topic')), minlength=3).argmax()
           for s, lab in zip(streams, labels)}
    assert top['science'] != top['cooking']
    # The dataset opens as a MADSDataset whose agents see every domain, bin and topic.
    from streaming import Stream

    from streaming_mads import MADSDataset
    ds = MADSDataset(streams=[Stream(local=s.local) for s in streams], batch_size=2,
                     pool_ratio=2, shuffle=False)
    assert ds.num_samples == sum(s.num_samples for s in streams)
    assert ds[0]['tokens'].shape == (256,)
    assert [a.name for a in ds.agents] == ['quality', 'domain', 'topic']
    assert set(ds.agents[1].value_names) == {'cooking', 'science', 'spam'}
    assert ds.agents[2].value_names == ('t00', 't01', 't02')
    assert ds.agents[0].freq.sum() == ds.num_samples
    ids = np.arange(ds.num_samples)
    assert [domain.values[i] for i in store.gather('domain', ids[[0, -1]])] == ['cooking', 'spam']
    kept = [sample['tokens'] for sample in ds]  # Iterates: pools of 4 candidates keep 2.
    assert len(kept) == len(ds) == (ds.num_samples + 1) // 2
    del ds
    # Inspect prints the tables.
    assert main(['inspect', str(out)]) == 0
    text = capsys.readouterr().out
    for word in ('domain (categorical)', 'quality (score)', 'topic (categorical)', 'top terms',
                 'cooking', '[4, 5]'):
        assert word in text


def test_label_text_mode_domain_column_and_plugin(corpus, tmp_path):
    out = tmp_path / 'text'
    convert([str(corpus / 'science.jsonl'), str(corpus / 'cooking')], str(out), mode='text',
            layout='single', meta_fields=['kind'], size_limit=3000, progress=False)
    scorer = tmp_path / 'scorer.py'
    scorer.write_text('def by_length(texts):\n    return [len(t) / 1000 for t in texts]\n')
    report = label_dataset(str(out), quality_scorer=f'{scorer}:by_length', topics=2, workers=2,
                           progress=False)
    assert report.streams[0]['samples'] == 32
    streams, _, _ = discover_streams(str(out))
    lab = StreamLabels(streams[0].local, 32, 'x')
    assert lab.columns['domain']['values'] == ['cooking', 'science']  # From the domain column.
    from streaming import StreamingDataset
    ds = StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    texts = [ds[i]['text'] for i in range(len(ds))]
    assert np.allclose(lab.array('quality'), [len(t) / 1000 for t in texts], atol=1e-6)
    topics = np.asarray(lab.array('topic'))
    domains = np.asarray(lab.array('domain'))
    assert all(len(set(topics[domains == d])) == 1 for d in (0, 1)) and len(set(topics)) == 2
    # Domain from another metadata column; only that column is relabelled, others are kept.
    label_dataset(str(out), columns=['domain'], domain_from='column:kind', progress=False)
    lab = StreamLabels(streams[0].local, 32, 'x')
    assert lab.columns['domain']['values'] == ['', 'a', 'b']
    assert set(lab.columns) == {'domain', 'quality', 'topic'}
    with pytest.raises(LabelingError, match='no column'):
        label_dataset(str(out), columns=['domain'], domain_from='column:nope', progress=False)


def test_label_is_idempotent_and_resumes(corpus, tmp_path, monkeypatch):
    a, b = tmp_path / 'a', tmp_path / 'b'
    _convert(corpus, a)
    shutil.copytree(a, b)
    label_dataset(str(a), topics=3, workers=2, progress=False)
    first = _sidecar(a)
    assert first and any(k.endswith('topic.npy') for k in first)
    label_dataset(str(a), topics=3, workers=2, progress=False)
    assert _sidecar(a) == first  # Re-running gives the same bytes.

    # Interrupt b after a few shards of pass 1 (inline, so the patch applies).
    real = labeling.run_score
    calls = []

    def flaky(job):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(job)
        return real(job)

    monkeypatch.setattr(labeling, 'run_score', flaky)
    with pytest.raises(KeyboardInterrupt):
        label_dataset(str(b), topics=3, workers=1, progress=False)
    monkeypatch.setattr(labeling, 'run_score', real)
    works = [os.path.join(b, d, 'mads', '.work') for d in ('cooking', 'science', 'spam')]
    assert sum(len([f for f in os.listdir(w) if f.startswith('score-')]) for w in works) == 4
    assert not os.path.exists(os.path.join(b, 'cooking', 'mads', 'manifest.json'))

    # Interrupt again in pass 2.
    real_topic = labeling.run_assign
    monkeypatch.setattr(labeling, 'run_assign', lambda job: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        label_dataset(str(b), topics=3, workers=1, progress=False)
    monkeypatch.setattr(labeling, 'run_assign', real_topic)

    report = label_dataset(str(b), topics=3, workers=2, progress=False)
    total_shards = sum(s['shards'] for s in report.streams)
    assert sum(s['resumed'] for s in report.streams) == total_shards  # Pass 1 all reused.
    assert _sidecar(b) == first


def test_stale_labels_and_bad_datasets(corpus, tmp_path, capsys):
    out = tmp_path / 'out'
    _convert(corpus, out)
    assert main(['label', str(out), '--topics', '2', '--no-progress']) == 0
    capsys.readouterr()
    # Rewrite the shards of one stream (e.g. a re-conversion with other settings) under its labels.
    other = tmp_path / 'other'
    _convert(corpus, other, seq_len=200)
    stream = out / 'science'
    for name in os.listdir(stream):
        if name != 'mads':
            os.remove(stream / name)
    for name in os.listdir(other / 'science'):
        shutil.copy(other / 'science' / name, stream / name)
    s = discover_streams(str(stream))[0][0]
    with pytest.raises(LabelError, match='stale|cover'):
        StreamLabels(s.local, s.num_samples, 'science')
    assert main(['inspect', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'science' in err and 'mads label' in err
    assert main(['label', str(out), '--topics', '2', '--no-progress']) == 0  # Relabelling fixes it.
    assert main(['inspect', str(out)]) == 0
    capsys.readouterr()
    # A shard that no longer matches its index.
    shard = sorted(n for n in os.listdir(stream) if n.endswith('.zstd'))[0]
    with open(stream / shard, 'ab') as f:
        f.write(b'junk')
    assert main(['label', str(out), '--topics', '2', '--no-progress', '--workers', '1']) == 2
    assert 'index.json says' in capsys.readouterr().err
    # Not a dataset; too few samples for the topics; token ids without a tokenizer.
    assert main(['label', str(tmp_path / 'nothing')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    assert main(['label', str(out / 'cooking'), '--topics', '1000', '--no-progress']) == 2
    assert 'lower --topics' in capsys.readouterr().err
    bare = tmp_path / 'bare'
    shutil.copytree(out / 'cooking', bare)
    assert main(['label', str(bare), '--no-progress']) == 2
    assert '--tokenizer' in capsys.readouterr().err
    assert main(['label', str(bare), '--tokenizer', 'bytes', '--topics', '2', '--no-progress']) == 0
    assert main(['label', str(bare), '--quality-scorer', 'nope', '--no-progress']) == 2
    assert 'module:function' in capsys.readouterr().err


def test_remote_dataset_and_reused_topic_model(corpus, tmp_path):
    remote = tmp_path / 'remote'
    _convert(corpus, remote)
    cache = tmp_path / 'cache'
    report = label_dataset(str(remote), local=str(cache), topics=2, progress=False)
    assert len(report.streams) == 3
    for name in ('cooking', 'science', 'spam'):
        # Labels are uploaded beside the remote index, and equal the cached ones.
        assert open(remote / name / 'mads' / 'manifest.json', 'rb').read() == \
            open(cache / name / 'mads' / 'manifest.json', 'rb').read()
        assert (remote / name / 'mads' / 'topics' / 'centroids.npy').is_file()
        assert not (remote / name / 'mads' / '.work').exists()
    text = inspect_dataset(str(remote), local=str(tmp_path / 'cache2'))
    assert 'topic (categorical)' in text
    # New data assigned to the same clusters.
    new = tmp_path / 'new'
    convert([str(corpus / 'cooking')], str(new), seq_len=256, progress=False)
    label_dataset(str(new), columns=['topic'], topics_from=str(remote / 'cooking' / 'mads' / 'topics'),
                  progress=False)
    old_meta = json.load(open(remote / 'cooking' / 'mads' / 'topics' / 'topics.json'))
    new_meta = json.load(open(new / 'cooking' / 'mads' / 'topics' / 'topics.json'))
    assert new_meta == old_meta
    old = np.asarray(StreamLabels(str(remote / 'cooking'), report.streams[0]['samples'], 'c').array('topic'))
    new_ids = np.asarray(StreamLabels(str(new / 'cooking'), len(old), 'c').array('topic'))
    assert np.array_equal(old, new_ids)


def _swap_letters(src, dst):
    """A different corpus of the same byte lengths (so the same sample count): a<->o, e<->i."""
    table = str.maketrans('aoei', 'oaie')
    for dirpath, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            with open(os.path.join(src, rel), encoding='utf-8') as f:
                text = f.read()
            if name.endswith('.jsonl'):
                lines = [json.loads(line) for line in text.splitlines()]
                text = ''.join(json.dumps({**o, 'text': o['text'].translate(table)}) + '\n'
                               for o in lines)
            else:
                text = text.translate(table)
            with open(os.path.join(dst, rel), 'w', encoding='utf-8') as f:
                f.write(text)
    return dst


@pytest.mark.parametrize('hashes', [('xxh3_64',), ()])
def test_labels_copied_from_another_corpus_are_refused(corpus, tmp_path, capsys, hashes):
    """Uncompressed, same sample count: with shard hashes (convert's default) the index.json
    files differ; without (`--hashes none`, like most foreign MDS) they are byte-identical and the
    labels' own shard hashes tell the corpora apart."""
    other = _swap_letters(corpus, tmp_path / 'other-corpus')
    a, b = tmp_path / 'a', tmp_path / 'b'
    for src, out in ((corpus, a), (other, b)):
        _convert(src, out, layout='single', compression=None, hashes=hashes)
    index_a, index_b = (open(d / 'index.json', 'rb').read() for d in (a, b))
    assert (index_a == index_b) == (not hashes)
    assert _sidecar(a) == {} and read_convert_info(str(a))['options']['hashes'] == list(hashes)
    assert main(['label', str(a), '--columns', 'domain,quality', '--no-progress']) == 0
    manifest = json.load(open(a / 'mads' / 'manifest.json'))
    assert ('shard_hashes' in manifest) == (not hashes)  # Bound by the index, or by the labels.
    shutil.copytree(a / 'mads', b / 'mads')
    capsys.readouterr()
    assert main(['inspect', str(b)]) == 2
    err = capsys.readouterr().err
    assert 'copied from another dataset' in err and f'mads label {b}' in err
    assert main(['inspect', str(a)]) == 0  # The original still opens.


def test_corrupt_shards_and_label_files_are_refused(corpus, tmp_path, capsys):
    out = tmp_path / 'out'
    _convert(corpus, out, layout='single', compression=None)
    assert main(['label', str(out), '--columns', 'domain,quality', '--no-progress']) == 0
    # A label column damaged in place: plausible values, same size. inspect prints no statistics.
    path = out / 'mads' / 'quality.npy'
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(3.0).tobytes()
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(['inspect', str(out)]) == 2
    captured = capsys.readouterr()
    assert 'mean' not in captured.out
    assert str(path) in captured.err and f'mads label {out} --columns quality' in captured.err
    assert path.read_bytes() == bytes(data)  # Nothing deleted.
    assert main(['label', str(out), '--columns', 'quality', '--no-progress']) == 0  # The fix.
    assert main(['inspect', str(out)]) == 0
    # A shard modified under its index.json (same size): its hash no longer matches.
    shard = sorted(out.glob('shard.*.mds'))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(['label', str(out), '--columns', 'quality', '--no-progress', '--workers', '1']) == 2
    err = capsys.readouterr().err
    assert shard.name in err and 'xxh3_64 hash in its index.json' in err


def test_similarity_to_a_reference_ranks_its_theme_first_and_resumes(corpus, tmp_path, monkeypatch,
                                                                     capsys):
    from streaming_mads.selection.agents import build_agent
    out = tmp_path / 'out'
    _convert(corpus, out)
    # The reference: new prose about space, converted the same way (the science stream's theme).
    rng = np.random.default_rng(7)
    (tmp_path / 'refsrc').mkdir()
    with open(tmp_path / 'refsrc' / 'ref.jsonl', 'w') as f:
        for _ in range(6):
            f.write(json.dumps({'text': _doc(rng, SPACE)}) + '\n')
    ref = tmp_path / 'ref'
    convert([str(tmp_path / 'refsrc' / 'ref.jsonl')], str(ref), seq_len=256, progress=False)
    # Bad combinations fail before any work, naming the fix.
    with pytest.raises(LabelingError, match='pass --reference'):
        label_dataset(str(out), columns=['similarity'], progress=False)
    with pytest.raises(LabelingError, match='add similarity to --columns'):
        label_dataset(str(out), columns=['domain'], reference=str(ref), progress=False)
    with pytest.raises(LabelingError, match='--reference'):
        label_dataset(str(out), reference=str(tmp_path / 'nope'), progress=False)
    assert not os.path.exists(out / 'science' / 'mads')

    # Interrupted in pass 2, then resumed: the same bytes as a run straight through.
    clean = tmp_path / 'clean'
    shutil.copytree(out, clean)
    real = labeling.run_assign
    monkeypatch.setattr(labeling, 'run_assign', lambda job: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        label_dataset(str(out), reference=str(ref), topics=2, workers=1, progress=False)
    monkeypatch.setattr(labeling, 'run_assign', real)
    report = label_dataset(str(out), reference=str(ref), topics=2, workers=2, progress=False)
    assert report.columns == ['domain', 'quality', 'topic', 'similarity']
    assert main(['label', str(clean), '--reference', str(ref), '--topics', '2',
                 '--no-progress']) == 0
    assert 'similarity' in capsys.readouterr().out
    assert _sidecar(out) == _sidecar(clean)

    streams, _, _ = discover_streams(str(out), None, None)
    labels, store = _store(streams)
    sim = {s.name: np.asarray(lab.array('similarity')) for s, lab in zip(streams, labels)}
    assert all(0 <= v.min() and v.max() <= 1 for v in sim.values())
    assert sim['science'].min() >= max(sim['cooking'].max(), sim['spam'].max())
    assert sim['science'].mean() > 0.6 > max(sim['cooking'].mean(), sim['spam'].mean())
    meta = json.load(open(out / 'science' / 'mads' / 'similarity' / 'similarity.json'))
    assert meta['corpus_samples'] == sum(s.num_samples for s in streams)
    # The preset agent bins it: the science samples fill the top bins.
    agent = build_agent('similarity')
    agent.bind(store)
    assert agent.num_values == 5 and agent.freq.sum() == sum(s.num_samples for s in streams)


def test_inspect_shows_similarity_in_its_percentile_bins(tmp_path):
    """The similarity label is a percentile in [0, 1]: inspect tabulates it in the similarity
    agent's bins (labelled as percentiles), not in the 0-5 quality bins (all in the first)."""
    from streaming import MDSWriter

    from streaming_mads.labeling.inspect import inspect_dataset
    from streaming_mads.labels import score, write_labels
    from streaming_mads.score_bins import SIMILARITY_BINS
    stream = tmp_path / 'stream'
    with MDSWriter(out=str(stream), columns={'text': 'str'}) as writer:
        for i in range(40):
            writer.write({'text': f'sample {i}'})
    sim = np.arange(40, dtype=np.float32) / 39
    write_labels(str(stream), {'similarity': score(sim), 'quality': score(np.arange(40) / 8)})
    text = inspect_dataset(str(stream))
    assert 'quality (score)' in text and '[4, 5]' in text  # Quality keeps its 0-5 bins.
    assert text.count('similarity (score') == 1  # One header, then the column's fit line.
    table = text.split('similarity (score, percentile)\n', 1)[1].split('\n\n', 1)[0]
    assert table.startswith('fit')
    labels = SIMILARITY_BINS.labels()
    assert labels[0] == '[0%, 50%)' and labels[-1] == '[95%, 100%]'
    counts = [int(next(line for line in table.splitlines() if line.startswith(label))
                  [len(label):].split()[0]) for label in labels]
    expected = np.bincount(np.searchsorted(SIMILARITY_BINS.edges, sim, side='right'), minlength=5)
    assert counts == expected.tolist() and max(counts) < len(sim)


def _wait_for(predicate, what, timeout=120.0):
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.05)


def test_a_second_label_run_on_one_dataset_stops_at_once_naming_the_first(corpus, tmp_path):
    """Two real `mads label` processes on one dataset: the first holds the lock (its scorer waits
    for a gate file), the second exits promptly with the owner's pid, host and start time; the
    first ends with the labels of an undisturbed run. A run killed -9 leaves its lock file, which
    the next run on this host takes over; a lock file from another host is refused."""
    import socket
    import subprocess
    import sys
    import time
    from streaming_mads.labeling.lock import LOCK_NAME
    out, twin = tmp_path / 'out', tmp_path / 'twin'
    _convert(corpus, out)
    shutil.copytree(out, twin)
    gate = tmp_path / 'gate'
    scorer = tmp_path / 'gated.py'
    scorer.write_text('import os, time\n'
                      'from streaming_mads.labeling.quality import default_scorer\n'
                      'def gated(texts):\n'
                      f'    while not os.path.exists({str(gate)!r}):\n'
                      '        time.sleep(0.02)\n'
                      '    return default_scorer(texts)\n')
    args = ['label', '--topics', '2', '--workers', '1', '--no-progress',
            '--quality-scorer', f'{scorer}:gated']
    cli = [sys.executable, '-m', 'streaming_mads.run.cli']
    locks = [out / d / 'mads' / LOCK_NAME for d in ('cooking', 'science', 'spam')]

    def locked_by(pid):
        try:
            return all(json.loads(p.read_text() or '{}').get('pid') == pid for p in locks)
        except (OSError, ValueError):
            return False

    first = subprocess.Popen([*cli, *args[:1], str(out), *args[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: locked_by(first.pid) or first.poll() is not None, 'the first run\'s lock')
        assert first.poll() is None, first.communicate()
        start = time.monotonic()
        second = subprocess.run([*cli, *args[:1], str(out), *args[1:]], capture_output=True,
                                text=True, timeout=120)
        waited = time.monotonic() - start
        assert second.returncode == 2, second.stderr
        err = second.stderr
        assert 'Another mads label run is labelling' in err and 'Traceback' not in err
        assert f'pid {first.pid} on host {socket.gethostname()}' in err and 'since 20' in err
        assert f'kill {first.pid}' in err
        assert waited < 60  # Process start-up; it never waits on the first run.
        assert first.poll() is None  # Still labelling, undisturbed.
        gate.touch()
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not any(p.exists() for p in locks)  # Deleted when the run ends.
    label_dataset(str(twin), topics=2, workers=1, progress=False,
                  quality_scorer=f'{scorer}:gated')
    assert _sidecar(out) == _sidecar(twin)

    # kill -9 while holding the lock: the file stays; the next run here takes it over.
    gate.unlink()
    victim = subprocess.Popen([*cli, *args[:1], str(out), '--restart', *args[1:]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: locked_by(victim.pid) or victim.poll() is not None, 'the victim\'s lock')
    finally:
        victim.kill()
        victim.wait()
    assert locked_by(victim.pid)
    gate.touch()
    label_dataset(str(out), topics=2, workers=1, progress=False, quality_scorer=f'{scorer}:gated')
    assert not any(p.exists() for p in locks) and _sidecar(out) == _sidecar(twin)

    # A lock file from another host (a shared file system) is refused, and says what to do.
    locks[1].write_text(json.dumps({'pid': 4242, 'host': 'elsewhere',
                                    'since': '2024-01-01T00:00:00+00:00'}))
    with pytest.raises(LabelingError, match='pid 4242 on host elsewhere.*2024-01-01') as info:
        label_dataset(str(out), topics=2, workers=1, progress=False)
    assert f'delete {locks[1]}' in str(info.value)
    assert locks[1].exists() and not locks[0].exists()  # Left alone; nothing else kept locked.
