"""Causal LMs built from a config with random init (no weight download), wrapped for Composer."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Optional

__all__ = ['build_causal_lm', 'mpt_to_gpt2', 'PRESETS', 'MPT_NAME']

#: Named model sizes. ``tiny`` trains in seconds on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    'tiny': dict(family='gpt2', n_layer=2, n_head=2, n_embd=64),
    'small-cpu': dict(family='gpt2', n_layer=4, n_head=4, n_embd=128),
    'gpt2-125m': dict(family='gpt2', n_layer=12, n_head=12, n_embd=768),
    'llama-1b': dict(family='llama', num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, hidden_size=2048, intermediate_size=8192),
}


#: llm-foundry's ``model.name`` of the MPT family, which :func:`mpt_to_gpt2` reads as a GPT-2.
MPT_NAME = 'mpt_causal_lm'

# MPT keys that are GPT-2 config fields under another name (MPT defaults in _MPT_DEFAULTS).
_MPT_FIELDS = {'d_model': 'n_embd', 'n_heads': 'n_head', 'n_layers': 'n_layer',
               'emb_pdrop': 'embd_pdrop', 'resid_pdrop': 'resid_pdrop',
               'norm_eps': 'layer_norm_epsilon', 'tie_word_embeddings': 'tie_word_embeddings',
               'use_cache': 'use_cache'}
_MPT_DEFAULTS = {'d_model': 2048, 'n_heads': 16, 'n_layers': 24, 'expansion_ratio': 4,
                 'emb_pdrop': 0.0, 'resid_pdrop': 0.0}
# MPT keys whose only value here is the one GPT-2 has (MPT's default, or "off").
_MPT_FIXED = {'learned_pos_emb': True, 'no_bias': False, 'attention_bias': None,
              'embedding_fraction': 1.0, 'logit_scale': None, 'use_pad_tok_in_ffn': True,
              'block_overrides': None, 'final_logit_softcapping': None, 'head_dim': None,
              'master_weights_dtype': None}
_MPT_ATTN_FIXED = {'attn_type': 'multihead_attention', 'qk_ln': False, 'qk_gn': False,
                   'clip_qkv': None, 'softmax_scale': None, 'attn_uses_sequence_id': False,
                   'sliding_window_size': -1, 'attn_logit_softcapping': None, 'alibi': False,
                   'rope': False, 'nope': False, 'kv_dim': None}
# Attention keys without an effect here: kernel choices (same math) or settings of features off.
_MPT_ATTN_FREE = {'fused_qkv', 'kv_n_heads', 'alibi_bias_max', 'rope_theta', 'rope_impl', 'rope_dail_config',
                  'rope_hf_config', 'attn_temperature_tuning'}


def _mpt_value(where: str, value: Any, *allowed: Any) -> None:
    if value not in allowed:
        raise ValueError(f'{where}={value!r}: the GPT-2 built here takes '
                         f'{" or ".join(repr(a) for a in allowed)}.')


def _pop_fixed(cfg: dict[str, Any], fixed: dict[str, Any], prefix: str) -> None:
    for key, allowed in fixed.items():
        if key in cfg:
            _mpt_value(f'{prefix}{key}', cfg.pop(key), allowed)


def mpt_to_gpt2(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """llm-foundry's MPT ``model`` keys as the fields of the GPT-2 :func:`build_causal_lm` builds.

    MPT with its defaults (learned positions, biases, LayerNorm, a GELU MLP, tied embeddings) is
    a GPT-2, so an llm-foundry pretraining YAML trains here with its sizes: ``d_model``,
    ``n_heads``, ``n_layers``, ``expansion_ratio``, ``max_seq_len``, ``vocab_size``, the dropouts,
    ``norm_eps``. A key that would build another network here (ALiBi, RoPE, GQA, no bias, ...)
    is refused, naming it; kernel choices are taken as the same math and noted. The table is in
    docs/configuration.md ("llm-foundry YAMLs").

    Args:
        cfg (dict[str, Any]): The ``model`` section without ``name``.

    Returns:
        tuple[dict[str, Any], list[str]]: ``model`` fields for ``mads train`` (``family: gpt2``,
        GPT-2 config fields, and ``vocab_size`` / ``max_seq_len`` when given), and notes on what
        runs differently from llm-foundry (one line each).

    Raises:
        ValueError: Naming the first MPT key or value the GPT-2 here cannot honour.
    """
    cfg = {**_MPT_DEFAULTS, **cfg}
    out: dict[str, Any] = {'family': 'gpt2', 'activation_function': 'gelu'}
    notes: list[str] = []
    for key in ('vocab_size', 'max_seq_len'):
        if key in cfg:
            out[key] = cfg.pop(key)
    ratio = cfg.pop('expansion_ratio')
    inner = ratio * cfg['d_model']
    if isinstance(ratio, bool) or not float(inner).is_integer():
        raise ValueError(f'model.expansion_ratio={ratio!r} times d_model={cfg["d_model"]} must be '
                         f'a whole number of MLP units.')
    out['n_inner'] = int(inner)
    for key, field in _MPT_FIELDS.items():
        if key in cfg:
            out[field] = cfg.pop(key)
    _pop_fixed(cfg, _MPT_FIXED, 'model.')
    # Placement and kernel choices: the same network either way.
    _mpt_value('model.init_device', cfg.pop('init_device', 'cpu'), 'cpu', 'meta', 'mixed')
    _mpt_value('model.norm_type', cfg.pop('norm_type', 'layernorm'), 'layernorm',
               'low_precision_layernorm')
    _mpt_value('model.loss_fn', cfg.pop('loss_fn', 'torch_crossentropy'), 'torch_crossentropy',
               'fused_crossentropy')
    fc = cfg.pop('fc_type', 'torch')
    _mpt_value('model.fc_type', fc.get('name') if isinstance(fc, dict) else fc, 'torch')
    ffn = dict(cfg.pop('ffn_config', None) or {})
    _mpt_value('model.ffn_config.ffn_type', ffn.pop('ffn_type', 'mptmlp'), 'mptmlp')
    act = dict(ffn.pop('ffn_act_fn', None) or {'name': 'gelu'})
    _mpt_value('model.ffn_config.ffn_act_fn.name', act.pop('name', None), 'gelu')
    approximate = act.pop('approximate', 'none')
    _mpt_value('model.ffn_config.ffn_act_fn.approximate', approximate, 'none', 'tanh')
    if act or ffn:
        raise ValueError(f'model.ffn_config: {(sorted(act) or sorted(ffn))[0]!r} is not '
                         f'honoured by the GPT-2 MLP here.')
    out['activation_function'] = 'gelu' if approximate == 'none' else 'gelu_new'
    attn = dict(cfg.pop('attn_config', None) or {})
    out['attn_pdrop'] = attn.pop('attn_pdrop', 0.0)
    _pop_fixed(attn, _MPT_ATTN_FIXED, 'model.attn_config.')
    impl = attn.pop('attn_impl', 'torch')
    _mpt_value('model.attn_config.attn_impl', impl, 'torch', 'flash', 'triton')
    if impl != 'torch':
        notes.append(f'model.attn_config.attn_impl={impl}: attention runs as PyTorch\'s '
                     f'scaled_dot_product_attention (the same math; on a GPU it picks a flash '
                     f'kernel itself).')
    unknown = sorted(set(attn) - _MPT_ATTN_FREE)
    if unknown:
        raise ValueError(f'model.attn_config.{unknown[0]} is not honoured by the GPT-2 here.')
    if 'init_config' in cfg:
        cfg.pop('init_config')
        notes.append('model.init_config: weights are initialised as GPT-2\'s (normal, std '
                     '0.02), not with MPT\'s init_config.')
    if cfg:
        raise ValueError(f'model.{sorted(cfg)[0]} is not an MPT key the GPT-2 here honours.')
    return out, notes


def _check_fields(config_cls: Any, fields: dict[str, Any], family: str) -> None:
    """Refuse keys the config class does not know.

    Hugging Face configs store unknown keyword arguments as plain attributes, so a typo such as
    ``n_layr=3`` would silently train the preset's depth instead.
    """
    known = set(inspect.signature(config_cls.__init__).parameters) - {'self', 'kwargs'}
    known |= set(vars(config_cls()).keys()) | set(getattr(config_cls, 'attribute_map', {}))
    unknown = sorted(set(fields) - known)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f'did you mean {close[0]!r}?' if close else \
            f'see transformers.{config_cls.__name__} for its fields.'
        raise ValueError(f'model.{key} is not a field of the {family} model config '
                         f'({config_cls.__name__}): {hint}')


def build_causal_lm(vocab_size: int, max_seq_len: int, preset: Optional[str] = 'tiny',
                    seed: Optional[int] = None, **overrides: Any) -> Any:
    """A Hugging Face causal LM from a config (GPT-2 or Llama family), as a Composer model.

    Args:
        vocab_size (int): Tokenizer vocabulary size.
        max_seq_len (int): Longest sequence (position embeddings).
        preset (str, optional): One of :data:`PRESETS`; overrides may change any config field.
        seed (int, optional): Seed for the random initialisation.
        **overrides: Config fields (e.g. ``n_layer=6``) and ``family`` (``gpt2`` or ``llama``).
    """
    import torch
    import transformers
    from composer.models import HuggingFaceModel

    if preset is not None and preset not in PRESETS:
        raise ValueError(f'Unknown model preset {preset!r}: use one of {sorted(PRESETS)}.')
    cfg = {**(PRESETS[preset] if preset else {}), **overrides}
    family = cfg.pop('family', 'gpt2')
    if family == 'gpt2':
        _check_fields(transformers.GPT2Config, cfg, family)
        config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=max_seq_len, **cfg)
        cls = transformers.GPT2LMHeadModel
    elif family == 'llama':
        _check_fields(transformers.LlamaConfig, cfg, family)
        config = transformers.LlamaConfig(vocab_size=vocab_size,
                                          max_position_embeddings=max_seq_len, **cfg)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(f'Unknown model family {family!r}: use gpt2 or llama.')
    if seed is not None:
        torch.manual_seed(seed)
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    return HuggingFaceModel(cls(config), tokenizer=None, use_logits=True, shift_labels=True,
                            metrics=[LanguageCrossEntropy()],
                            eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()])
