"""The influence pass at scale: micro-batches, activation checkpointing, bf16 autocast, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from test_influence import lm_batch, make_gpt2

from streaming_mads.influence import (covered_parameters, influence_memory, per_sample_influence,
                                      reference_gradient, reference_gradient_bytes)

#: bf16 autocast vs fp32: largest |difference| relative to the largest |influence|.
BF16_RTOL = 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_micro_batches_and_checkpointing_are_exact() -> None:
    model = make_gpt2(n_layer=2)  # float64: any difference beyond rounding is a bug.
    probe, reference = lm_batch(10, seed=1), lm_batch(7, seed=2)
    params = [p.detach().clone() for p in model.parameters()]
    grad = reference_gradient(model, reference)
    expected = per_sample_influence(model, probe, grad)
    for options in ({'micro_batch': 3}, {'checkpoint': True}, {'micro_batch': 2, 'checkpoint': True}):
        got_grad = reference_gradient(model, reference, **options)
        for g, e in zip(got_grad.values(), grad.values()):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)
        got = per_sample_influence(model, probe, got_grad, **options)
        assert got.shape == expected.shape and _rel(got, expected) < 1e-12, options
    # The blocks' forwards are restored and nothing was written.
    assert not any('forward' in vars(m) for m in model.modules())
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_blocks_the_model_checkpoints_itself() -> None:
    # Composer's and llm-foundry's activation_checkpointing wrap blocks in torch's
    # CheckpointWrapper: the pass follows their recomputation instead of keeping block inputs.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import \
        apply_activation_checkpointing
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    model = make_gpt2(n_layer=3)
    probe, reference = lm_batch(9, seed=8), lm_batch(5, seed=9)
    grad = reference_gradient(model, reference)
    expected = per_sample_influence(model, probe, grad)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, GPT2Block))
    for options in ({}, {'micro_batch': 4, 'checkpoint': True}):
        got = per_sample_influence(model, probe, reference_gradient(model, reference, **options),
                                   **options)
        assert _rel(got, expected) < 1e-12, options


def test_bf16_autocast_agrees_with_fp32() -> None:
    model = make_gpt2(n_layer=2).float()
    probe, reference = lm_batch(12, seed=3), lm_batch(6, seed=4)
    grad = reference_gradient(model, reference)
    expected = per_sample_influence(model, probe, grad)
    bf16 = dict(autocast_dtype=torch.bfloat16, micro_batch=4, checkpoint=True)
    grad16 = reference_gradient(model, reference, **bf16)
    got = per_sample_influence(model, probe, grad16, **bf16)
    # Sums stay fp32 (the gradient and the dot products); only activations are bf16.
    assert all(g.dtype == torch.float32 for g in grad16.values()) and got.dtype == torch.float32
    err = _rel(got, expected)
    assert 0 < err <= BF16_RTOL, err  # > 0: the forward really ran in bf16.
    assert float(torch.corrcoef(torch.stack([got, expected]))[0, 1]) > 0.999
    big = expected.abs() > 0.1 * expected.abs().max()
    assert torch.equal(got[big].sign(), expected[big].sign())


def test_bf16_weights_accumulate_in_fp32() -> None:
    model = make_gpt2(n_layer=2).float()
    probe, reference = lm_batch(8, seed=5), lm_batch(4, seed=6)
    expected = per_sample_influence(model, probe, reference_gradient(model, reference))
    model = model.to(torch.bfloat16)  # Pure bf16, as FSDP's PURE mixed precision computes.
    grad = reference_gradient(model, reference, micro_batch=2)
    assert all(g.dtype == torch.float32 for g in grad.values())
    assert reference_gradient_bytes(model) == 4 * sum(p.numel() for p in covered_parameters(model))
    got = per_sample_influence(model, probe, grad, micro_batch=3)
    assert got.dtype == torch.float32 and _rel(got, expected) <= 5 * BF16_RTOL


def test_influence_memory_is_measured() -> None:
    model = make_gpt2(n_layer=2).float()
    memory = influence_memory(model, lm_batch(4, seed=7), checkpoint=True)
    assert memory.reference_gradient == reference_gradient_bytes(model) > 0
    if memory.probe_pass is not None:  # Linux /proc.
        assert memory.peak == memory.reference_gradient + memory.probe_pass


def test_peak_memory_stays_within_a_training_step() -> None:
    """GPT-2 (4 x 128, 512 tokens, micro-batch 2): long sequences, so activations dominate."""
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536', 'OMP_NUM_THREADS': '2'}
    script = os.path.join(os.path.dirname(__file__), 'memory_probe.py')
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    peaks = json.loads(out.strip().splitlines()[-1])
    assert 0 < peaks['influence'] <= peaks['train_step'], peaks
    # Checkpointing is what keeps it there: without it the pass needs more than the step.
    assert peaks['influence'] < 0.75 * peaks['influence_no_checkpointing'], peaks
