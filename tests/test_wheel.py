"""The wheel installs like a library: one namespace, the YAMLs inside, the CLI and entry points.

Built with pip from this checkout and installed into a fresh target folder; the checks run in a
child interpreter started with ``-S`` from another directory, so neither the source tree nor the
editable install of the development environment is on its path (only the target and the
environment's third-party packages, without their ``.pth`` hooks).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """``(wheel file, target folder)`` of a wheel built from this checkout."""
    out = tmp_path_factory.mktemp('wheel')
    # A copy of the checkout: setuptools leaves build/ in the tree it builds, whose stale files
    # would otherwise travel in later wheels, and nothing of the working tree is touched.
    src = out / 'src'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        '.git', '.venv', 'build', 'dist', '*.egg-info', '__pycache__', '.pytest_cache', 'runs',
        'mads-demo'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps',
                    '--no-build-isolation', '-w', str(out / 'dist'), str(src)], check=True)
    wheels = list((out / 'dist').glob('streaming_mads-*.whl'))
    assert len(wheels) == 1, wheels
    target = out / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--target',
                    str(target), str(wheels[0])], check=True)
    return wheels[0], target


def _run(target, *args: str, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()['purelib']]))
    done = subprocess.run([sys.executable, '-S', *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_wheel_holds_one_namespace_and_the_yamls(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')}
    assert tops == {'streaming_mads'}, tops
    assert 'streaming_mads/algorithms/agent_console.py' in names
    assert 'streaming_mads/algorithms/domain_bandit.py' in names
    shipped = sorted(n.rsplit('/', 1)[1] for n in names if n.startswith('streaming_mads/yamls/')
                     and n.endswith('.yaml'))
    assert shipped == sorted(f for f in os.listdir(os.path.join(ROOT, 'yamls')) if f.endswith('.yaml'))
    entry_points = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
    groups = configparser.ConfigParser(delimiters=('=',))
    groups.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    algorithms = {'mads_console': 'streaming_mads.algorithms.agent_console:AgentConsole',
                  'domain_bandit': 'streaming_mads.algorithms.domain_bandit:DomainBandit'}
    assert dict(groups['console_scripts']) == {'mads': 'streaming_mads.run.cli:main'}
    assert dict(groups['llmfoundry_dataloaders']) == {
        'mads': 'streaming_mads.run.foundry:build_mads_dataloader'}
    assert dict(groups['llmfoundry_algorithms']) == algorithms


def test_installed_package_runs_from_the_wheel(installed, tmp_path):
    _, target = installed
    probe = (
        'import importlib.metadata as md, os, streaming_mads, streaming_mads.algorithms as a\n'
        'from streaming_mads.run.config import load_config, shipped_configs\n'
        f'target = {str(target)!r}\n'
        'assert streaming_mads.__file__.startswith(target), streaming_mads.__file__\n'
        'assert a.__file__.startswith(target), a.__file__\n'
        'cfg = load_config("quickstart-cpu.yaml")\n'
        'assert cfg["train_loader"]["name"] == "mads", cfg["train_loader"]\n'
        'assert load_config("yamls/random-baseline-cpu.yaml")["train_loader"]["name"] == "streaming"\n'
        'dist = next(md.distributions(path=[target]))\n'
        'eps = {e.group + ":" + e.name: e.load() for e in dist.entry_points}\n'
        'assert eps["llmfoundry_algorithms:domain_bandit"] is a.DomainBandit\n'
        'assert eps["llmfoundry_algorithms:mads_console"] is a.AgentConsole\n'
        'print(",".join(shipped_configs()))\n')
    out = _run(target, '-c', probe, cwd=tmp_path)
    assert 'quickstart-cpu.yaml' in out and 'gpu-125m.yaml' in out
    help_text = _run(target, '-m', 'streaming_mads.run.cli', 'demo', '--help', cwd=tmp_path)
    assert 'usage: mads demo' in help_text


def test_console_script_from_the_wheel(installed, tmp_path):
    """The ``mads`` script pip wrote into the target starts from the installed package."""
    _, target = installed
    script = target / 'bin' / 'mads'
    assert script.exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run([str(script), 'demo', '--help'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'usage: mads demo' in done.stdout


def test_missing_config_names_the_shipped_ones(tmp_path):
    from streaming_mads.run.train import ConfigError
    from streaming_mads.run.config import load_config
    with pytest.raises(ConfigError, match='quickstart-cpu.yaml'):
        load_config(str(tmp_path / 'quickstart-cpux.yaml'))
