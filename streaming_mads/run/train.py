"""``mads train CONFIG.yaml [key=value ...]``: a Composer Trainer from an llm-foundry-style YAML.

The YAML names the model (a Hugging Face causal LM built from a config, random init), the
``train_loader`` (``name: mads`` for :class:`MADSDataset`, ``name: streaming`` for the uniform
baseline), optional ``eval_loaders`` (reference and per-domain held-out sets, evaluated for loss
and perplexity at ``eval_interval``), ``algorithms: {mads_console: {...}}`` (or ``domain_bandit``,
the ODM-style baseline), optimizer, scheduler,
duration, loggers, callbacks, checkpointing and FSDP settings passed to Composer. Command-line
``key.sub=value`` overrides are parsed as YAML values. Every error names the offending key.

Under ``composer -n N -m streaming_mads.run.cli train CONFIG.yaml`` each process builds the same
Trainer; Composer sets up torch.distributed (gloo on CPU, nccl on GPU) and Streaming partitions
the data across ranks.

The train and eval loaders come from :func:`streaming_mads.run.loader.build_dataloader`, the
builder behind llm-foundry's ``mads`` loader too, so token or text samples, the cut to
``max_seq_len`` and the batch-size guard are the same under both (docs/configuration.md, "Data
loaders").
"""

from __future__ import annotations

import copy
import importlib.resources
import os
from typing import Any, Callable, Optional, Sequence

import yaml

from streaming_mads.run.loader import ConfigError, build_dataloader

__all__ = ['ConfigError', 'find_config', 'shipped_configs', 'load_config', 'apply_overrides', 'build_trainer', 'train']

TOP_LEVEL = {
    'run_name', 'seed', 'max_seq_len', 'model', 'tokenizer', 'train_loader', 'eval_loaders',
    'eval_interval', 'eval_subset_num_batches', 'algorithms', 'optimizer', 'scheduler',
    'max_duration', 'global_train_batch_size', 'device_train_microbatch_size', 'device',
    'precision', 'loggers', 'callbacks', 'progress_bar', 'log_to_console', 'console_log_interval',
    'save_folder', 'save_interval', 'save_num_checkpoints_to_keep', 'save_overwrite', 'load_path',
    'autoresume', 'fsdp_config', 'dist_timeout', 'python_log_level', 'variables'
}
REQUIRED = ('max_seq_len', 'model', 'train_loader', 'max_duration', 'global_train_batch_size')


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


def load_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML run config (a path or a shipped name, :func:`find_config`), apply overrides."""
    try:
        cfg = yaml.safe_load(find_config(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f'{path} is not valid YAML: {err}') from err
    if not isinstance(cfg, dict):
        raise ConfigError(f'{path} must hold a mapping of settings at the top level.')
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``cfg`` with each ``a.b.c=value`` set (``value`` parsed as YAML)."""
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
        node[parts[-1]] = yaml.safe_load(raw)
    return cfg


def _section(cfg: dict[str, Any], key: str, required: bool = False) -> dict[str, Any]:
    value = cfg.get(key)
    if value is None:
        if required:
            raise ConfigError(f'Missing required key {key!r}.')
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f'{key!r} must be a mapping, got {type(value).__name__}.')
    return dict(value)


def _positive_int(cfg: dict[str, Any], key: str, default: Optional[int] = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == 'seed' else 1):
        raise ConfigError(f'{key!r} must be a positive integer, got {value!r}.')
    return value


def _call(where: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # Bad values and unknown keys, named by location.
        raise ConfigError(f'{where}: {err}') from err


def _vocab_size(cfg: dict[str, Any], model_cfg: dict[str, Any], train_dataset: Any,
                tokenizer: Any) -> int:
    """``model.vocab_size``, else ``tokenizer.vocab_size``, else the tokenizer ``tokenizer.name``
    loads, else the one ``mads convert`` recorded beside the training data (fetched from the remote
    for remote streams)."""
    if 'vocab_size' in model_cfg:
        return int(model_cfg.pop('vocab_size'))
    tok = _section(cfg, 'tokenizer')
    if 'vocab_size' in tok:
        return int(tok['vocab_size'])
    if tokenizer is not None:
        return int(tokenizer.vocab_size)
    from streaming_mads.checks import convert_info, dataset_streams
    found = convert_info(dataset_streams(train_dataset))
    if found is not None:
        record = found[1]
        size = (record.get('tokenizer') or {}).get('vocab_size') or record.get('vocab_size')
        if size:
            return int(size)
    raise ConfigError('model.vocab_size is not set and no mads_convert.json beside the training '
                      'data (local, or next to a remote index) names a tokenizer: set '
                      'model.vocab_size.')


def _tokenizer(cfg: dict[str, Any]) -> Any:
    """The tokenizer ``tokenizer.name`` names (``'bytes'``, a local ``tokenizer.json`` or tokenizer
    directory), or ``None``: text samples are then tokenised with the one ``mads convert``
    recorded beside them."""
    name = _section(cfg, 'tokenizer').get('name')
    if name is None:
        return None
    from streaming_mads.tokenizer import TokenizerError, load_tokenizer
    try:
        return load_tokenizer(str(name))
    except TokenizerError as err:
        raise ConfigError(f'tokenizer.name: {err}') from err


def _eval_loaders(cfg: dict[str, Any], device_batch: int, max_seq_len: int,
                  tokenizer: Any) -> list[Any]:
    """``eval_loaders``: ``{label, batch_size, dataset, ...}`` loaders (``name`` defaults to
    ``streaming``), evaluated for loss and perplexity."""
    from composer.core import Evaluator
    specs = cfg.get('eval_loaders') or []
    if not isinstance(specs, list):
        raise ConfigError('eval_loaders must be a list of {label, dataset: {...}}.')
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        label = spec.pop('label', None)
        if not label:
            raise ConfigError(f'eval_loaders[{i}] needs a label.')
        batch = spec.pop('batch_size', device_batch)
        loader = build_dataloader({'name': 'streaming', **spec}, tokenizer, batch,
                                  max_seq_len=max_seq_len, where=f'eval_loaders[{i}] ({label})')
        out.append(Evaluator(label=label, dataloader=loader,
                             metric_names=['LanguageCrossEntropy', 'LanguagePerplexity']))
    return out


def _optimizer(cfg: dict[str, Any], model: Any) -> Any:
    import torch
    from composer.optim import DecoupledAdamW
    opt = _section(cfg, 'optimizer') or {'name': 'decoupled_adamw', 'lr': 1e-3}
    name = opt.pop('name', 'decoupled_adamw')
    classes = {'adamw': torch.optim.AdamW, 'decoupled_adamw': DecoupledAdamW,
               'sgd': torch.optim.SGD}
    if name not in classes:
        raise ConfigError(f'optimizer.name {name!r} is not one of {sorted(classes)}.')
    if 'betas' in opt:
        opt['betas'] = tuple(opt['betas'])
    return _call('optimizer', classes[name], {'params': model.parameters(), **opt})


def _scheduler(cfg: dict[str, Any]) -> Optional[Any]:
    from composer import optim
    sched = _section(cfg, 'scheduler')
    if not sched:
        return None
    name = sched.pop('name', None)
    classes = {'constant': optim.ConstantScheduler,
               'constant_with_warmup': optim.ConstantWithWarmupScheduler,
               'cosine_with_warmup': optim.CosineAnnealingWithWarmupScheduler,
               'linear_with_warmup': optim.LinearWithWarmupScheduler,
               'cosine': optim.CosineAnnealingScheduler}
    if name not in classes:
        raise ConfigError(f'scheduler.name {name!r} is not one of {sorted(classes)}.')
    return _call('scheduler', classes[name], sched)


def _named(section: str, cfg: dict[str, Any], classes: dict[str, Any]) -> list[Any]:
    out = []
    for name, kwargs in _section(cfg, section).items():
        if name not in classes:
            raise ConfigError(f'{section}.{name} is not one of {sorted(classes)}.')
        out.append(_call(f'{section}.{name}', classes[name], dict(kwargs or {})))
    return out


def _algorithms(cfg: dict[str, Any]) -> list[Any]:
    from streaming_mads.algorithms import ALGORITHMS as known
    algos = _section(cfg, 'algorithms')
    unknown = set(algos) - set(known)
    if unknown:
        raise ConfigError(f'algorithms.{sorted(unknown)[0]} is unknown: the algorithms here are '
                          'mads_console and domain_bandit (a baseline).')
    if len(algos) > 1:
        raise ConfigError('algorithms: use one of mads_console and domain_bandit, not both (each '
                          'publishes the dataset\'s weights).')
    out = []
    for name, kwargs in algos.items():
        kwargs = dict(kwargs or {})
        if name == 'mads_console' and 'reference' not in kwargs:
            raise ConfigError('algorithms.mads_console.reference is required (an MDS reference '
                              'set).')
        out.append(_call(f'algorithms.{name}', known[name], kwargs))
    return out


def _check_tokenizers(model: Any, train_dataset: Any, evaluators: Sequence[Any],
                      algorithms: Sequence[Any]) -> None:
    """Refuse mismatched tokenizers now rather than at the first console update or eval."""
    from streaming_mads.checks import check_run
    evals = {ev.label: ev.dataloader.dataloader.dataset for ev in evaluators}
    reference = None
    for algo in algorithms:
        if hasattr(algo, 'reference_tokenizer_info'):
            try:
                reference = algo.reference_tokenizer_info()
            except FileNotFoundError as err:  # No reference there, or not at its split.
                raise ConfigError(f'algorithms.{getattr(algo, "section", "mads_console")}'
                                  f'.reference: {err}') from err
    check_run(model, train_dataset, evals, reference)


def build_trainer(cfg: dict[str, Any], extra_loggers: Sequence[Any] = (),
                  extra_callbacks: Sequence[Any] = ()) -> Any:
    """A Composer ``Trainer`` for the run config ``cfg`` (see the module docstring)."""
    from composer import Trainer, callbacks, loggers
    from composer.utils import dist, reproducibility

    from streaming_mads.models import build_causal_lm

    unknown = set(cfg) - TOP_LEVEL
    if unknown:
        raise ConfigError(f'Unknown top-level key {sorted(unknown)[0]!r}; known keys: '
                          f'{sorted(TOP_LEVEL)}.')
    for key in REQUIRED:
        if key not in cfg:
            raise ConfigError(f'Missing required key {key!r}.')
    seed = _positive_int(cfg, 'seed', 17)
    reproducibility.seed_all(seed)
    device = cfg.get('device', 'cpu')
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(device, timeout=float(cfg.get('dist_timeout', 300)))
    world = dist.get_world_size()
    global_batch = _positive_int(cfg, 'global_train_batch_size')
    if global_batch % world:
        raise ConfigError(f'global_train_batch_size={global_batch} is not divisible by the '
                          f'{world} ranks.')
    device_batch = global_batch // world
    max_seq_len = _positive_int(cfg, 'max_seq_len')
    model_cfg = _section(cfg, 'model', required=True)
    # The data first: the model's default vocabulary is the one recorded beside it.
    tokenizer = _tokenizer(cfg)
    train_loader = build_dataloader(_section(cfg, 'train_loader', required=True), tokenizer,
                                    device_batch, max_seq_len=max_seq_len)
    train_dataset = train_loader.dataloader.dataset
    vocab = _vocab_size(cfg, model_cfg, train_dataset, tokenizer)
    preset = model_cfg.pop('preset', None if 'family' in model_cfg else 'tiny')
    model = _call('model', build_causal_lm, {'vocab_size': vocab, 'max_seq_len': max_seq_len,
                                             'preset': preset, 'seed': seed, **model_cfg})
    evaluators = _eval_loaders(cfg, device_batch, max_seq_len, tokenizer)
    algorithms = _algorithms(cfg)
    _check_tokenizers(model, train_dataset, evaluators, algorithms)
    parallelism = {'fsdp': cfg['fsdp_config']} if cfg.get('fsdp_config') else None
    logger_classes = {'file': loggers.FileLogger, 'tensorboard': loggers.TensorboardLogger,
                      'wandb': loggers.WandBLogger, 'mlflow': loggers.MLFlowLogger,
                      'inmemory': loggers.InMemoryLogger}
    callback_classes = {'speed_monitor': callbacks.SpeedMonitor, 'lr_monitor': callbacks.LRMonitor,
                        'memory_monitor': callbacks.MemoryMonitor,
                        'runtime_estimator': callbacks.RuntimeEstimator,
                        'optimizer_monitor': callbacks.OptimizerMonitor}
    scheduler = _scheduler(cfg)
    kwargs = dict(
        run_name=cfg.get('run_name'), model=model, train_dataloader=train_loader,
        eval_dataloader=evaluators or None, eval_interval=cfg.get('eval_interval', 1),
        eval_subset_num_batches=cfg.get('eval_subset_num_batches', -1),
        max_duration=cfg['max_duration'], optimizers=_optimizer(cfg, model),
        schedulers=scheduler, algorithms=algorithms,
        loggers=_named('loggers', cfg, logger_classes) + list(extra_loggers),
        callbacks=_named('callbacks', cfg, callback_classes) + list(extra_callbacks),
        device=device, precision=cfg.get('precision', 'fp32'),
        device_train_microbatch_size=cfg.get('device_train_microbatch_size', device_batch),
        progress_bar=cfg.get('progress_bar', False), log_to_console=cfg.get('log_to_console', True),
        console_log_interval=cfg.get('console_log_interval', '10ba'), seed=seed,
        save_folder=cfg.get('save_folder'), save_interval=cfg.get('save_interval', '1ep'),
        save_num_checkpoints_to_keep=cfg.get('save_num_checkpoints_to_keep', -1),
        save_overwrite=cfg.get('save_overwrite', False), load_path=cfg.get('load_path'),
        autoresume=cfg.get('autoresume', False), parallelism_config=parallelism,
        python_log_level=cfg.get('python_log_level'))
    return _call('trainer', Trainer, kwargs)


def train(config: str, overrides: Sequence[str] = ()) -> Any:
    """Build the Trainer for ``config`` (with overrides), fit it, and return it."""
    trainer = build_trainer(load_config(config, overrides))
    trainer.fit()
    return trainer
