"""``mads train CONFIG.yaml [key=value ...]``: a Composer Trainer from an llm-foundry-style YAML.

The YAML names the model (a Hugging Face causal LM built from a config, random init), the
``train_loader`` (``name: mads`` for :class:`MADSDataset`, ``name: streaming`` for the uniform
baseline), optional ``eval_loaders`` (reference and per-domain held-out sets, evaluated for loss
and perplexity at ``eval_interval``), ``algorithms: {mads_console: {...}}`` (or ``domain_bandit``,
the ODM-style baseline), optimizer, scheduler,
duration, loggers, callbacks, checkpointing and FSDP settings passed to Composer. Command-line
``key.sub=value`` overrides are parsed as YAML values. Every error names the offending key.

An llm-foundry pretraining YAML runs as it is once its ``train_loader`` says ``name: mads``:
``${...}`` interpolations and ``variables:`` are resolved with OmegaConf after the overrides (as
llm-foundry resolves them), its keys that Composer can honour are passed on (``eval_loader``,
``device_eval_batch_size``, ``eval_first``, Composer algorithms such as ``gradient_clipping``,
checkpointing, ...), an MPT ``model:`` becomes the GPT-2 of the same sizes
(:func:`streaming_mads.models.mpt_to_gpt2`), and a key that only llm-foundry runs (``icl_tasks``,
``eval_gauntlet``, ``tp_config``, ...) is refused, naming the llm-foundry route
(docs/configuration.md, "llm-foundry YAMLs").

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
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

from streaming_mads.run.config import (FOUNDRY_ROUTE, TRAINER_KEYS, check_keys, load_config,
                                       resolve_config)
from streaming_mads.run.loader import ConfigError, build_dataloader

__all__ = ['ConfigError', 'build_trainer', 'train', 'COMPOSER_ALGORITHMS']

#: Composer algorithms by the names llm-foundry registers them under (and Composer's EMA, SWA and
#: layer freezing), for ``algorithms: {NAME: {kwargs}}`` beside the console.
COMPOSER_ALGORITHMS = {
    'gradient_clipping': 'GradientClipping', 'alibi': 'Alibi',
    'gated_linear_units': 'GatedLinearUnits', 'low_precision_layernorm': 'LowPrecisionLayerNorm',
    'ema': 'EMA', 'swa': 'SWA', 'layer_freezing': 'LayerFreezing',
}


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


def _tokenizer(cfg: dict[str, Any], max_seq_len: int) -> Any:
    """The tokenizer ``tokenizer.name`` names (``'bytes'``, a local ``tokenizer.json`` or tokenizer
    directory), or ``None``: text samples are then tokenised with the one ``mads convert``
    recorded beside them. Of llm-foundry's ``tokenizer.kwargs``, ``model_max_length`` is
    accepted (samples are cut to ``max_seq_len``, which it may not undercut)."""
    section = _section(cfg, 'tokenizer')
    unknown = sorted(set(section) - {'name', 'kwargs', 'vocab_size'})
    if unknown:
        raise ConfigError(f'tokenizer.{unknown[0]} is unknown: tokenizer takes name, kwargs and '
                          f'vocab_size.')
    kwargs = dict(section.get('kwargs') or {})
    length = kwargs.pop('model_max_length', max_seq_len)
    if kwargs:
        raise ConfigError(f'tokenizer.kwargs.{sorted(kwargs)[0]} is not honoured here (only '
                          f'model_max_length is); {FOUNDRY_ROUTE}.')
    if isinstance(length, bool) or not isinstance(length, int) or length < max_seq_len:
        raise ConfigError(f'tokenizer.kwargs.model_max_length={length!r} is below max_seq_len='
                          f'{max_seq_len}: samples are cut to max_seq_len here; lower that.')
    name = section.get('name')
    if name is None:
        return None
    from streaming_mads.tokenizer import TokenizerError, load_tokenizer
    try:
        return load_tokenizer(str(name))
    except TokenizerError as err:
        hint = '' if os.path.exists(str(name)) else (
            f' A Hugging Face hub name is never downloaded: save that tokenizer to a folder once '
            f'(AutoTokenizer.from_pretrained({str(name)!r}).save_pretrained(DIR)) and set '
            f'tokenizer.name: DIR, or {FOUNDRY_ROUTE}.')
        raise ConfigError(f'tokenizer.name: {err}{hint}') from err


def _loader(spec: dict[str, Any], default: str) -> dict[str, Any]:
    """A loader section with llm-foundry's ``name: text`` read as ``streaming`` (both a plain
    StreamingDataset of token or text samples)."""
    spec = dict(spec)
    name = spec.get('name') or default
    spec['name'] = 'streaming' if name == 'text' else name
    return spec


def _eval_specs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """``eval_loaders`` (a list of ``{label, ...}``) or llm-foundry's ``eval_loader`` (one set,
    labelled ``eval``, or a list as ``eval_loaders``)."""
    single, many = cfg.get('eval_loader'), cfg.get('eval_loaders')
    if single is not None and many is not None:
        raise ConfigError('Set eval_loader (one eval set, label "eval") or eval_loaders (a list '
                          'of {label, dataset: {...}}), not both.')
    if isinstance(single, dict):
        return [{'label': 'eval', **single}]
    specs = single if single is not None else (many or [])
    key = 'eval_loader' if single is not None else 'eval_loaders'
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise ConfigError(f'{key} must be a list of {{label, dataset: {{...}}}}.')
    return specs


def _eval_loaders(cfg: dict[str, Any], device_batch: int, max_seq_len: int,
                  tokenizer: Any) -> list[Any]:
    """The eval sets (:func:`_eval_specs`; ``name`` defaults to ``streaming``), evaluated for loss
    and perplexity in batches of ``batch_size``, else ``device_eval_batch_size``, else the device
    train batch."""
    from composer.core import Evaluator
    default_batch = _positive_int(cfg, 'device_eval_batch_size', device_batch)
    out = []
    for i, spec in enumerate(_eval_specs(cfg)):
        spec = _loader(spec, 'streaming')
        label = spec.pop('label', None)
        if not label:
            raise ConfigError(f'eval_loaders[{i}] needs a label.')
        batch = spec.pop('batch_size', default_batch)
        loader = build_dataloader(spec, tokenizer, batch,
                                  max_seq_len=max_seq_len, where=f'eval_loaders[{i}] ({label})')
        out.append(Evaluator(label=label, dataloader=loader, device_eval_microbatch_size=batch,
                             metric_names=['LanguageCrossEntropy', 'LanguagePerplexity']))
    return out


def _pick(key: str, name: Any, classes: dict[str, Any]) -> Any:
    """``classes[name]``; another name is an error listing them and, for what llm-foundry
    registers beyond them, its route."""
    if name not in classes:
        raise ConfigError(f'{key} {name!r} is not one of {sorted(classes)}; for one registered '
                          f'with llm-foundry, {FOUNDRY_ROUTE}.')
    return classes[name]


def _optimizer(cfg: dict[str, Any], model: Any) -> Any:
    import torch
    from composer.optim import DecoupledAdamW
    opt = _section(cfg, 'optimizer') or {'name': 'decoupled_adamw', 'lr': 1e-3}
    name = opt.pop('name', 'decoupled_adamw')
    classes = {'adamw': torch.optim.AdamW, 'decoupled_adamw': DecoupledAdamW,
               'sgd': torch.optim.SGD}
    cls = _pick('optimizer.name', name, classes)
    if 'betas' in opt:
        opt['betas'] = tuple(opt['betas'])
    return _call('optimizer', cls, {'params': model.parameters(), **opt})


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
               'linear_decay_with_warmup': optim.LinearWithWarmupScheduler,  # llm-foundry's name
               'cosine': optim.CosineAnnealingScheduler}
    return _call('scheduler', _pick('scheduler.name', name, classes), sched)


def _named(section: str, cfg: dict[str, Any], classes: dict[str, Any]) -> list[Any]:
    out = []
    for name, kwargs in _section(cfg, section).items():
        cls = _pick(f'{section}:', name, classes)
        out.append(_call(f'{section}.{name}', cls, dict(kwargs or {})))
    return out


def _algorithms(cfg: dict[str, Any]) -> list[Any]:
    """The console or the bandit (at most one: each publishes the dataset's weights) and any
    :data:`COMPOSER_ALGORITHMS`, each built with its section as keyword arguments."""
    import composer.algorithms

    from streaming_mads.algorithms import ALGORITHMS as ours
    algos = _section(cfg, 'algorithms')
    unknown = set(algos) - set(ours) - set(COMPOSER_ALGORITHMS)
    if unknown:
        raise ConfigError(f'algorithms.{sorted(unknown)[0]} is unknown: the algorithms here are '
                          f'mads_console and domain_bandit (a baseline), and Composer\'s '
                          f'{", ".join(sorted(COMPOSER_ALGORITHMS))}. For another algorithm '
                          f'registered with llm-foundry, {FOUNDRY_ROUTE}.')
    if len(set(algos) & set(ours)) > 1:
        raise ConfigError('algorithms: use one of mads_console and domain_bandit, not both (each '
                          'publishes the dataset\'s weights).')
    out = []
    for name, kwargs in algos.items():
        kwargs = dict(kwargs or {})
        if name == 'mads_console' and 'reference' not in kwargs:
            raise ConfigError('algorithms.mads_console.reference is required (an MDS reference '
                              'set).')
        cls = ours[name] if name in ours else getattr(composer.algorithms,
                                                      COMPOSER_ALGORITHMS[name])
        out.append(_call(f'algorithms.{name}', cls, kwargs))
    return out


def _check_tokenizers(model: Any, train_dataset: Any, evaluators: Sequence[Any],
                      algorithms: Sequence[Any], tokenizer_name: Optional[str] = None) -> None:
    """Refuse mismatched tokenizers (the datasets', and ``tokenizer.name``'s) now rather than at
    the first console update or eval."""
    from streaming_mads.checks import check_run, configured_tokenizer_info
    evals = {ev.label: ev.dataloader.dataloader.dataset for ev in evaluators}
    reference = None
    for algo in algorithms:
        if hasattr(algo, 'reference_tokenizer_info'):
            try:
                reference = algo.reference_tokenizer_info()
            except FileNotFoundError as err:  # No reference there, or not at its split.
                raise ConfigError(f'algorithms.{getattr(algo, "section", "mads_console")}'
                                  f'.reference: {err}') from err
    check_run(model, train_dataset, evals, reference, configured_tokenizer_info(tokenizer_name))


def _model_fields(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """``model``: this package's fields, or llm-foundry's MPT keys (``name: mpt_causal_lm``) as
    the same-sized GPT-2 (:func:`streaming_mads.models.mpt_to_gpt2`; what runs differently is
    warned about, what cannot run here is refused with the llm-foundry route)."""
    from streaming_mads.models import MPT_NAME, mpt_to_gpt2
    name = model_cfg.pop('name', None)
    if name is None:
        return model_cfg
    if name != MPT_NAME:
        raise ConfigError(f'model.name {name!r}: mads train builds {MPT_NAME} (as a GPT-2 of its '
                          f'sizes) or a model from `preset` / `family` (no name); for other '
                          f'llm-foundry models, {FOUNDRY_ROUTE}.')
    try:
        fields, notes = mpt_to_gpt2(model_cfg)
    except ValueError as err:
        raise ConfigError(f'{err} For this MPT, {FOUNDRY_ROUTE}.') from err
    for note in notes:
        warnings.warn(f'{note} For the MPT itself, {FOUNDRY_ROUTE}.', stacklevel=3)
    return fields


def _parallelism(cfg: dict[str, Any], world: int) -> Optional[dict[str, Any]]:
    """``fsdp_config`` for Composer; dropped with a warning on one process, as llm-foundry does
    (there is nothing to shard across)."""
    if not cfg.get('fsdp_config'):
        return None
    if world == 1:
        warnings.warn('fsdp_config is not applicable to a single process: training without '
                      'FSDP, as llm-foundry does.', stacklevel=3)
        return None
    return {'fsdp': cfg['fsdp_config']}


def _log_config(trainer: Any, cfg: dict[str, Any]) -> None:
    """llm-foundry's ``log_config`` (default on): the resolved config as hyperparameters, with
    ``metadata`` merged in (``flatten_metadata``, default on) or kept as one key."""
    if not cfg.get('log_config', True):
        return
    logged = copy.deepcopy(cfg)
    metadata = logged.get('metadata') or {}
    if not isinstance(metadata, dict):
        raise ConfigError('metadata must be a mapping of names to values.')
    if cfg.get('flatten_metadata', True) and metadata:
        logged.pop('metadata')
        clash = sorted(set(metadata) & set(logged))
        if clash:
            raise ConfigError(f'metadata.{clash[0]} is also a config key: rename it or set '
                              f'flatten_metadata: false.')
        logged.update(metadata)
    trainer.logger.log_hyperparameters(logged)


def build_trainer(cfg: dict[str, Any], extra_loggers: Sequence[Any] = (),
                  extra_callbacks: Sequence[Any] = ()) -> Any:
    """A Composer ``Trainer`` for the run config ``cfg`` (see the module docstring)."""
    import torch
    from composer import Trainer, callbacks, loggers
    from composer.utils import dist, reproducibility

    from streaming_mads.models import build_causal_lm

    cfg = resolve_config(cfg)
    check_keys(cfg)
    seed = _positive_int(cfg, 'seed', 17)
    reproducibility.seed_all(seed)
    # As Composer and llm-foundry choose it when the YAML does not say.
    device = cfg.get('device') or ('gpu' if torch.cuda.is_available() else 'cpu')
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(device, timeout=float(cfg.get('dist_timeout', 300)))
    world = dist.get_world_size()
    global_batch = _positive_int(cfg, 'global_train_batch_size')
    if global_batch % world:
        raise ConfigError(f'global_train_batch_size={global_batch} is not divisible by the '
                          f'{world} ranks.')
    device_batch = global_batch // world
    max_seq_len = _positive_int(cfg, 'max_seq_len')
    model_cfg = _model_fields(_section(cfg, 'model', required=True))
    # The data first: the model's default vocabulary is the one recorded beside it.
    tokenizer = _tokenizer(cfg, max_seq_len)
    train_loader = build_dataloader(_loader(_section(cfg, 'train_loader', required=True), 'mads'),
                                    tokenizer, device_batch, max_seq_len=max_seq_len)
    train_dataset = train_loader.dataloader.dataset
    vocab = _vocab_size(cfg, model_cfg, train_dataset, tokenizer)
    preset = model_cfg.pop('preset', None if 'family' in model_cfg else 'tiny')
    positions = model_cfg.pop('max_seq_len', max_seq_len)
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < max_seq_len:
        raise ConfigError(f'model.max_seq_len={positions!r} must be a whole number of at least '
                          f'the run\'s max_seq_len={max_seq_len}.')
    model = _call('model', build_causal_lm, {'vocab_size': vocab, 'max_seq_len': positions,
                                             'preset': preset, 'seed': seed, **model_cfg})
    evaluators = _eval_loaders(cfg, device_batch, max_seq_len, tokenizer)
    if cfg.get('eval_first') and not evaluators:
        raise ConfigError('eval_first: true needs an eval set (eval_loader or eval_loaders).')
    algorithms = _algorithms(cfg)
    _check_tokenizers(model, train_dataset, evaluators, algorithms,
                      _section(cfg, 'tokenizer').get('name'))
    parallelism = _parallelism(cfg, world)
    logger_classes = {'file': loggers.FileLogger, 'tensorboard': loggers.TensorboardLogger,
                      'wandb': loggers.WandBLogger, 'mlflow': loggers.MLFlowLogger,
                      'inmemory': loggers.InMemoryLogger}
    callback_classes = {'speed_monitor': callbacks.SpeedMonitor, 'lr_monitor': callbacks.LRMonitor,
                        'memory_monitor': callbacks.MemoryMonitor,
                        'runtime_estimator': callbacks.RuntimeEstimator,
                        'optimizer_monitor': callbacks.OptimizerMonitor}
    scheduler = _scheduler(cfg)
    # Progress shows by default: on a terminal as a bar, elsewhere (log files, CI, captured output)
    # as Composer's metric lines; both at once garble each other. The console prints its own line
    # per update either way.
    bar = cfg.get('progress_bar', _on_terminal())
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
        progress_bar=bar, log_to_console=cfg.get('log_to_console', not bar),
        console_log_interval=cfg.get('console_log_interval', '10ba'), seed=seed,
        save_folder=cfg.get('save_folder'), save_interval=cfg.get('save_interval', '1ep'),
        save_num_checkpoints_to_keep=cfg.get('save_num_checkpoints_to_keep', -1),
        save_overwrite=cfg.get('save_overwrite', False), load_path=cfg.get('load_path'),
        autoresume=cfg.get('autoresume', False), parallelism_config=parallelism,
        python_log_level=cfg.get('python_log_level'),
        **{key: cfg[key] for key in TRAINER_KEYS if key in cfg})
    trainer = _call('trainer', Trainer, kwargs)
    _log_config(trainer, cfg)
    return trainer


def _on_terminal() -> bool:
    """Whether stderr, Composer's console stream, is a terminal (its progress bar needs one: it
    fails on a stream without a file descriptor, and fills a log file with redrawn bars)."""
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def _history_in_run_folder(cfg: dict[str, Any]) -> dict[str, Any]:
    """``mads train`` keeps the console's weight history in the run folder: the console writes
    it into a local ``save_folder`` by itself; without one, into ``<run_name>/`` (``history`` set
    in the YAML wins). docs/configuration.md, "Weight history"."""
    from streaming_mads.console.history import HISTORY_FILE
    from streaming_mads.remote import is_url
    save, algos = cfg.get('save_folder'), cfg.get('algorithms')
    if (save and not is_url(str(save))) or not isinstance(algos, dict):
        return cfg
    for name in ('mads_console', 'domain_bandit'):
        if name in algos and isinstance(algos[name] or {}, dict):
            algos[name] = {'history': f'{{run_name}}/{HISTORY_FILE}', **(algos[name] or {})}
    return cfg


def train(config: str, overrides: Sequence[str] = ()) -> Any:
    """Build the Trainer for ``config`` (with overrides), evaluate first if ``eval_first`` (and
    not resuming past batch 0, as llm-foundry), fit it, and return it."""
    cfg = _history_in_run_folder(load_config(config, overrides))
    trainer = build_trainer(cfg)
    if cfg.get('eval_first') and int(trainer.state.timestamp.batch) == 0:
        trainer.eval()
    trainer.fit()
    return trainer
