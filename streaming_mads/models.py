"""Causal LMs built from a config with random init (no weight download), wrapped for Composer."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Optional

__all__ = ['build_causal_lm', 'PRESETS']

#: Named model sizes. ``tiny`` trains in seconds on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    'tiny': dict(family='gpt2', n_layer=2, n_head=2, n_embd=64),
    'small-cpu': dict(family='gpt2', n_layer=4, n_head=4, n_embd=128),
    'gpt2-125m': dict(family='gpt2', n_layer=12, n_head=12, n_embd=768),
    'llama-1b': dict(family='llama', num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, hidden_size=2048, intermediate_size=8192),
}


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
