"""The README's code runs as written: the Python snippet ("In Python") and the pipeline commands
("The pipeline"), on small data built here; only the data paths (and the training budget of the
pipeline's `mads train`) are changed."""

from __future__ import annotations

import json
import os
import re
import shlex

import numpy as np
from lm_corpus import write_reference
from streaming import MDSWriter

from streaming_mads.run.cli import main
from streaming_mads.run.config import load_config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def readme_block(section: str, language: str) -> str:
    """The first ``language`` code block under the README heading ``## section``."""
    text = open(README, encoding='utf-8').read()
    body = text.split(f'\n## {section}\n', 1)[1].split('\n## ', 1)[0]
    found = re.search(rf'```{language}\n(.*?)```', body, re.S)
    assert found, f'README section {section!r} has no {language} block'
    return found.group(1)


def test_python_snippet_runs_as_written(tmp_path):
    code = readme_block('In Python', 'python')
    assert "'/data/my-stream'" in code and "'/data/reference-mds'" in code
    data, ref = str(tmp_path / 'stream'), str(tmp_path / 'ref')
    rng = np.random.default_rng(0)
    with MDSWriter(out=data, columns={'tokens': 'ndarray:int32', 'domain': 'str'},
                   compression='zstd', size_limit=1 << 12) as writer:
        for i in range(64):
            writer.write({'tokens': rng.integers(0, 32, 16).astype(np.int32),
                          'domain': ('web', 'code', 'books')[i % 3]})
    write_reference(ref)
    code = code.replace("'/data/my-stream'", repr(data)).replace("'/data/reference-mds'", repr(ref))
    namespace: dict = {'__name__': '__readme__'}
    exec(compile(code, README, 'exec'), namespace)  # noqa: S102 - the README's own code.
    trainer = namespace['trainer']
    # One epoch: 64 candidates, half kept (pool_ratio 2), in batches of 8.
    assert int(trainer.state.timestamp.batch) == 4
    manifest = json.load(open(os.path.join(data, 'mads', 'manifest.json')))
    assert {'domain', 'quality'} <= set(manifest['columns'])
    assert [type(a).__name__ for a in trainer.state.algorithms] == ['AgentConsole']
    trainer.close()


def _commands(block: str) -> list[list[str]]:
    """The block's `mads ...` commands, continuation lines joined, comments dropped."""
    joined = re.sub(r'\\\n\s*', ' ', block)
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if line.strip().startswith('mads ')]


def _user_text(out: str) -> None:
    """The pipeline's inputs under /data: web.jsonl, code/, books.txt, reference.jsonl and
    eval.jsonl (the demo corpus' domains, its reference and its evaluation topics)."""
    from streaming_mads.corpora.demo import build_demo_text
    text = build_demo_text(os.path.join(out, 'text'), code_bytes=1_000_000)  # 2048-token samples

    def texts(folder):
        return [open(os.path.join(folder, f), encoding='utf-8').read()
                for f in sorted(os.listdir(folder))]

    def jsonl(path, folder):
        with open(path, 'w', encoding='utf-8') as f:
            f.writelines(json.dumps({'text': t}) + '\n' for t in texts(folder))

    jsonl(os.path.join(out, 'web.jsonl'), text.train['docs'])
    os.symlink(text.train['code'], os.path.join(out, 'code'))
    with open(os.path.join(out, 'books.txt'), 'w', encoding='utf-8') as f:
        f.write('\n\n'.join(texts(text.train['docstrings'])))
    jsonl(os.path.join(out, 'reference.jsonl'), text.reference)
    jsonl(os.path.join(out, 'eval.jsonl'), text.evaluation)


def test_pipeline_commands_run_as_written(tmp_path, monkeypatch):
    block = readme_block('The pipeline', 'bash')
    commands = _commands(block.replace('/data/', f'{tmp_path}/'))
    assert [c[1] for c in commands][:3] == ['convert', 'convert', 'convert']
    train = next(c for c in commands if c[1] == 'train')
    assert train[2] == 'quickstart-cpu.yaml'  # The shipped YAML, found by name.
    _user_text(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for command in commands:
        if command[1] == 'train':  # Only the budget: 2 batches, evaluated at the end.
            command = [*command, 'max_duration=2ba', 'eval_interval=2ba']
        assert main(command[1:]) == 0, command
    # The run evaluated on the user's held-out set and reference, not the demo's paths.
    cfg = load_config(train[2], train[3:])
    assert [e['dataset']['local'] for e in cfg['eval_loaders']] == [
        f'{tmp_path}/eval-mds', f'{tmp_path}/reference-mds']
