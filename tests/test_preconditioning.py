"""The Adam-preconditioned influence (`reward: adam`): what it measures, and its bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from composer.optim import DecoupledAdamW
from test_influence import lm_batch, make_gpt2

from streaming_mads.influence import (InfluenceError, causal_lm_per_sample_loss, compute_influence,
                                      reference_gradient)
from streaming_mads.influence.preconditioning import adam_preconditioned


def _trained(steps: int = 3):
    """A GPT-2 and the DecoupledAdamW that took ``steps`` steps on it (real second moments)."""
    model = make_gpt2(seed=4)
    opt = DecoupledAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for s in range(steps):
        opt.zero_grad()
        causal_lm_per_sample_loss(model, lm_batch(8, seed=10 + s)).mean().backward()
        opt.step()
    opt.zero_grad()
    return model, opt


def _reference_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(causal_lm_per_sample_loss(model, batch).mean())


def test_adam_influence_is_the_loss_change_of_a_preconditioned_step():
    model, opt = _trained()
    reference, probes = lm_batch(6, seed=2), lm_batch(4, seed=1)
    rewards = compute_influence(model, probes, reference_grad=adam_preconditioned(
        reference_gradient(model, reference), opt))
    model.eval()  # As the influence pass runs: no dropout.
    eps = 1e-7
    for i in range(4):
        # Steps on probe i alone along ±Adam's direction P ∇ℓ(x_i), P from the optimizer state
        # (a central difference: the first-order change, without the second-order term).
        loss = causal_lm_per_sample_loss(model, {k: v[i:i + 1] for k, v in probes.items()})[0]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        losses = []
        for sign in (1, -1):
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for p, g, q in zip(moved.parameters(), grads, model.parameters()):
                    state = opt.state[q]
                    v_hat = state['exp_avg_sq'] / (1 - 0.95**float(state['step']))
                    p -= sign * eps * g / (v_hat.sqrt() + 1e-8)
            losses.append(_reference_loss(moved, reference))
        change = (losses[0] - losses[1]) / (2 * eps)
        assert float(rewards[i]) == pytest.approx(-change, rel=1e-5)
    # And it ranks probes differently from the plain inner product (the preconditioner matters).
    plain = compute_influence(model, probes, reference_grad=reference_gradient(model, reference))
    ratio = rewards / plain
    assert float(ratio.max() - ratio.min()) > 1e-3 * float(ratio.abs().max())


def test_frozen_parameters_count_zero_and_bad_optimizers_are_named():
    model, opt = _trained(steps=0)
    grad = reference_gradient(model, lm_batch(4, seed=2))
    with pytest.raises(InfluenceError, match='no Adam second moment'):
        adam_preconditioned(grad, opt)  # Not stepped yet: nothing to precondition with.
    with pytest.raises(InfluenceError, match='Adam-family optimizer.*reward: inner'):
        adam_preconditioned(grad, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(InfluenceError, match="needs the trainer's optimizer"):
        adam_preconditioned(grad, None)
    model, opt = _trained()
    frozen = model.transformer.wpe.weight
    opt.state.pop(frozen)
    # A parameter the optimizer does not train at all (in none of its groups) counts zero too.
    outside = model.transformer.ln_f.weight
    opt.param_groups[0]['params'] = [p for p in opt.param_groups[0]['params'] if p is not outside]
    opt.state.pop(outside)
    out = adam_preconditioned(reference_gradient(model, lm_batch(4, seed=2)), opt)
    assert torch.count_nonzero(out[frozen]) == 0 and torch.count_nonzero(out[outside]) == 0
    assert torch.count_nonzero(out[model.transformer.wte.weight]) > 0
