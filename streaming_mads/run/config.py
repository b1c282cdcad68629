"""The run YAML of ``mads train``: where it is found, how it is read, which keys it may hold.

A YAML is a path or the name of a shipped one (found through ``importlib.resources``, so it works
from a wheel); it is read as OmegaConf reads llm-foundry's files, ``key.sub=value`` overrides are
applied, then ``${...}`` interpolations and ``variables:`` are resolved, in llm-foundry's order.
Its top-level keys are those Composer can honour; llm-foundry's others are refused naming the
llm-foundry route (docs/configuration.md, "Run YAML" and "llm-foundry YAMLs").
"""

from __future__ import annotations

import copy
import importlib.resources
import os
from typing import Any, Sequence

from streaming_mads.run.loader import ConfigError

__all__ = ['ConfigError', 'FOUNDRY_ONLY', 'FOUNDRY_ROUTE', 'REQUIRED', 'TOP_LEVEL', 'TRAINER_KEYS',
           'apply_overrides', 'check_keys', 'find_config', 'load_config', 'resolve_config',
           'shipped_configs']

#: Trainer arguments a YAML may set under the same name (llm-foundry's ``TrainConfig`` keys).
TRAINER_KEYS = (
    'train_subset_num_batches', 'spin_dataloaders', 'accumulate_train_batch_on_tokens',
    'compile_config', 'save_filename', 'save_latest_filename', 'save_weights_only',
    'save_ignore_keys', 'load_weights_only', 'load_strict_model_weights', 'load_ignore_keys',
    'dist_timeout')
TOP_LEVEL = {
    'run_name', 'seed', 'max_seq_len', 'model', 'tokenizer', 'train_loader', 'eval_loaders',
    'eval_loader', 'eval_interval', 'eval_subset_num_batches', 'device_eval_batch_size',
    'eval_first', 'algorithms', 'optimizer', 'scheduler', 'max_duration',
    'global_train_batch_size', 'device_train_microbatch_size', 'device', 'precision', 'loggers',
    'callbacks', 'progress_bar', 'log_to_console', 'console_log_interval', 'log_config',
    'metadata', 'flatten_metadata', 'save_folder', 'save_interval',
    'save_num_checkpoints_to_keep', 'save_overwrite', 'load_path', 'autoresume', 'fsdp_config',
    'python_log_level', 'variables', *TRAINER_KEYS
}
REQUIRED = ('max_seq_len', 'model', 'train_loader', 'max_duration', 'global_train_batch_size')

#: Where a YAML goes that needs what only llm-foundry runs (named in every such error).
FOUNDRY_ROUTE = ('run the YAML with llm-foundry itself: `composer llmfoundry/scripts/train/train.py '
                 'CONFIG.yaml`, keeping train_loader.name: mads and algorithms.mads_console (this '
                 'package registers both there; docs/configuration.md, "llm-foundry")')

#: llm-foundry top-level keys ``mads train`` does not run, and what they are.
FOUNDRY_ONLY = {
    'icl_tasks': 'in-context-learning evaluation', 'icl_tasks_str': 'in-context-learning evaluation',
    'icl_subset_num_batches': 'in-context-learning evaluation',
    'icl_seq_len': 'in-context-learning evaluation', 'eval_gauntlet': 'the eval gauntlet',
    'eval_gauntlet_str': 'the eval gauntlet', 'tp_config': 'tensor parallelism',
    'code_paths': 'your own registry code', 'profiler': 'the profiler',
    'only_hf_checkpoint': 'Hugging Face checkpoint export',
    'only_composer_checkpoint': 'checkpoint export without training',
    'max_split_size_mb': 'CUDA allocator settings', 'expandable_segments': 'CUDA allocator settings',
    'cuda_load_lazy': 'CUDA allocator settings',
}
# Set by llm-foundry itself from global_train_batch_size; the same here.
_COMPUTED = ('device_train_batch_size', 'n_gpus', 'device_train_grad_accum')

def shipped_configs() -> list[str]:
    """Names of the run YAMLs installed with the package (``streaming_mads.yamls``)."""
    root = importlib.resources.files('streaming_mads.yamls')
    return sorted(p.name for p in root.iterdir() if p.name.endswith('.yaml'))


def find_config(path: str) -> str:
    """The YAML a user named: a file that exists, else a shipped config of that name.

    So ``mads train quickstart-cpu.yaml`` works from a wheel install, where ``yamls/`` sits in
    site-packages, not in the working directory. A local file always wins over a shipped one.

    Args:
        path (str): A file path, or the name of a shipped config (with or without ``.yaml``).

    Returns:
        str: The text of the config (read now, so an installed zip or wheel works as well).
    """
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            return f.read()
    name = os.path.basename(path)
    name = name if name.endswith('.yaml') else f'{name}.yaml'
    if name in shipped_configs() and os.path.dirname(path) in ('', 'yamls'):
        return importlib.resources.files('streaming_mads.yamls').joinpath(name).read_text('utf-8')
    raise ConfigError(f'Config file {path!r} does not exist, and no shipped config has that name '
                      f'(shipped: {", ".join(shipped_configs())}).')


def _parse_yaml(text: str, where: str) -> Any:
    """A YAML value as OmegaConf reads llm-foundry's files and command line (``1e-3`` is a
    float), with ``${...}`` kept for :func:`resolve_config`."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f'value={text}']))['value']
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f'{where} is not valid YAML: {err}') from err


def load_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML run config (a path or a shipped name, :func:`find_config`), apply overrides,
    then resolve its interpolations (:func:`resolve_config`), in llm-foundry's order."""
    cfg = _parse_yaml(find_config(path), path) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f'{path} must hold a mapping of settings at the top level.')
    return resolve_config(apply_overrides(cfg, overrides))


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return '${' in value
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    return False


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with its ``${key.sub}`` / ``${variables.name}`` interpolations resolved by OmegaConf
    and ``variables`` dropped, as llm-foundry's train script does (``om.resolve``).

    Values that are Python objects (a Stream, a loss function) are kept as they are.

    Raises:
        ConfigError: For an interpolation of a key that is not there, naming both.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    if _has_interpolation(cfg):
        try:
            cfg = OmegaConf.to_container(OmegaConf.create(cfg, flags={'allow_objects': True}),
                                         resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f'Interpolation: {err}. Interpolations name a key of this config: '
                              f'${{variables.NAME}} or ${{section.key}}.') from err
    return {key: value for key, value in cfg.items() if key != 'variables'}


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``cfg`` with each ``a.b.c=value`` set (``value`` parsed as YAML, as OmegaConf
    parses llm-foundry's command line; ``${...}`` is resolved afterwards, so an override may
    interpolate and ``variables.NAME=...`` changes every use of that variable)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'Override {item!r} must look like key.sub=value.')
        key, raw = item.split('=', 1)
        node = cfg
        parts = key.split('.')
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f'Override {key}: {part!r} is not a mapping.')
            node = child
        node[parts[-1]] = _parse_yaml(raw, f'Override {item!r}')
    return cfg


def check_keys(cfg: dict[str, Any]) -> None:
    """Every top-level key is one this runs; llm-foundry's others name the llm-foundry route."""
    for key in sorted(set(cfg) - TOP_LEVEL):
        if key in FOUNDRY_ONLY:
            raise ConfigError(f'{key} ({FOUNDRY_ONLY[key]}) is an llm-foundry feature mads train '
                              f'does not run: remove it, or {FOUNDRY_ROUTE}.')
        if key in _COMPUTED:
            raise ConfigError(f'{key} is computed from global_train_batch_size (divided by the '
                              f'ranks), here as in llm-foundry: remove it.')
        raise ConfigError(f'Unknown top-level key {key!r} (your own names go under `variables:`, '
                          f'used as ${{variables.NAME}}); known keys: {sorted(TOP_LEVEL)}.')
    for key in REQUIRED:
        if key not in cfg:
            raise ConfigError(f'Missing required key {key!r}.')
    for key in ('eval_first', 'log_config', 'flatten_metadata'):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f'{key} must be true or false, got {cfg[key]!r}.')
