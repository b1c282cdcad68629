"""Per-sample losses: the adapter both influence passes differentiate.

Influence needs one loss per sample (``PerSampleLoss``), not the batch mean a training step
uses; :func:`causal_lm_per_sample_loss` is the default for causal LMs (plain, Hugging Face or
Composer-wrapped). See docs/architecture.md ("Ghost influence") for how the losses are combined.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streaming_mads.collate import IGNORE_INDEX
from streaming_mads.influence.base import InfluenceError, PerSampleLoss, unwrap_ddp


def _unwrap_composer_hf(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a Composer ``HuggingFaceModel`` (else ``model`` itself)."""
    # Composer is only consulted if already imported: a Composer model implies it is.
    composer_hf = sys.modules.get('composer.models.huggingface')
    wrapper = getattr(composer_hf, 'HuggingFaceModel', None)
    if wrapper is not None and isinstance(model, wrapper):
        return model.model
    return model


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and 'logits' in output:
        return output['logits']
    logits = getattr(output, 'logits', None)
    if isinstance(logits, Tensor):
        return logits
    raise InfluenceError(f'Cannot find logits in a model output of type {type(output).__name__}; '
                         'return a tensor, a mapping with "logits" or an object with .logits.')


def causal_lm_per_sample_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-sample next-token cross-entropy of a causal LM: the mean over each sample's valid tokens.

    ``batch`` holds ``input_ids`` (``B x T``) and optionally ``attention_mask`` and ``labels``
    (``-100`` is ignored). Without ``labels``, the inputs are the labels with padding (mask 0)
    ignored. Labels are shifted by one as Hugging Face does. ``model`` is a Hugging Face causal LM,
    a Composer ``HuggingFaceModel`` (its ``.model`` is called directly, skipping Composer's loss) or
    any module called as ``model(input_ids=..., attention_mask=...)`` that returns logits. A sample
    without a valid target token has loss 0 (and so no influence).
    """
    net = _unwrap_composer_hf(unwrap_ddp(model))
    param = next(net.parameters(), None)
    device = param.device if param is not None else batch['input_ids'].device
    input_ids = batch['input_ids'].to(device)
    mask = batch.get('attention_mask')
    labels = batch.get('labels')
    kwargs: Dict[str, Any] = {'input_ids': input_ids}
    if mask is not None:
        mask = mask.to(device)
        kwargs['attention_mask'] = mask
    if getattr(getattr(net, 'config', None), 'use_cache', None) is not None:
        kwargs['use_cache'] = False  # A key/value cache is dead weight here.
    logits = _logits(net(**kwargs))
    if labels is None:
        labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels = labels.to(device)[:, 1:]
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction='none').view(labels.shape)
    num_valid = (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return token_loss.sum(dim=1) / num_valid


def per_sample_losses(loss_fn: PerSampleLoss, model: nn.Module, batch: Any) -> Tensor:
    """``loss_fn(model, batch)``, checked to be a non-empty 1-D tensor that has a gradient."""
    losses = loss_fn(model, batch)
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise InfluenceError(f'loss_fn must return a non-empty 1-D tensor of per-sample losses, '
                             f'got {shape}.')
    if not losses.requires_grad:
        raise InfluenceError('The per-sample losses do not depend on any covered parameter.')
    return losses
