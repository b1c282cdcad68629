"""Ghost influence (streaming_mads.influence) against a brute-force per-sample autograd loop."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Callable, Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streaming_mads.influence import (InfluenceError, causal_lm_per_sample_loss, compute_influence,
                                      covered_parameters, per_sample_influence, reference_gradient)

VOCAB = 64
SEQ = 16
PAD = 0
RTOL = 1e-6

# --------------------------------------------------------------------------------------------------
# Helpers.


def _slice(batch: Any, i: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[i:i + 1] for k, v in batch.items()}
    return type(batch)(v[i:i + 1] for v in batch)


def _num_samples(batch: Any) -> int:
    return (batch['input_ids'] if isinstance(batch, dict) else batch[0]).shape[0]


def brute_force(model: nn.Module, batch: Any, grads: Dict[nn.Parameter, Tensor],
                loss_fn: Callable[[nn.Module, Any], Tensor] = causal_lm_per_sample_loss) -> Tensor:
    """One backward per sample, each sample run ALONE, dotted with the reference gradient."""
    params = list(grads)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        for i in range(_num_samples(batch)):
            loss = loss_fn(model, _slice(batch, i))
            assert loss.shape == (1,)
            sample_grads = torch.autograd.grad(loss[0], params, allow_unused=True)
            out.append(sum(((g * grads[p]).sum() for g, p in zip(sample_grads, params) if g is not None),
                           torch.zeros((), dtype=torch.float64)))
    finally:
        for m, t in modes:
            m.training = t
    return torch.stack(out).to(torch.float64)


def plain_reference_gradient(model: nn.Module, batch: Any, params: Sequence[nn.Parameter],
                             loss_fn=causal_lm_per_sample_loss) -> List[Tensor]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        grads = torch.autograd.grad(loss_fn(model, batch).mean(), list(params), allow_unused=True)
    finally:
        for m, t in modes:
            m.training = t
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def assert_close_to_brute(ghost: Tensor, brute: Tensor, rtol: float = RTOL) -> None:
    assert ghost.shape == brute.shape
    scale = brute.abs().max()
    assert scale > 0
    err = (ghost.to(torch.float64) - brute).abs()
    assert float(err.max() / scale) <= rtol, (ghost, brute)
    # Per sample: relative to the sample itself (floored far below the batch scale).
    per_sample = err / torch.maximum(brute.abs(), 1e-9 * scale)
    assert float(per_sample.max()) <= rtol, (ghost, brute)


def lm_batch(num: int, seed: int, vocab: int = VOCAB, seq: int = SEQ, pad: int = PAD,
             labels: bool = True) -> Dict[str, Tensor]:
    """Varying lengths: mostly right-padded, a few left-padded, one with a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (num, seq), generator=gen)
    mask = torch.zeros(num, seq, dtype=torch.long)
    lengths = torch.randint(2, seq + 1, (num,), generator=gen)
    lengths[0] = seq
    for i, n in enumerate(lengths.tolist()):
        if i % 5 == 3:
            mask[i, seq - n:] = 1  # Left padding.
        else:
            mask[i, :n] = 1
    input_ids = input_ids.masked_fill(mask == 0, pad)
    batch = {'input_ids': input_ids, 'attention_mask': mask}
    if labels:
        lab = input_ids.masked_fill(mask == 0, -100)
        lab[1, :3] = -100  # Prompt tokens excluded from the loss.
        batch['labels'] = lab
    return batch


# --------------------------------------------------------------------------------------------------
# Models.


def make_gpt2(seed: int = 0, n_layer: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
                        pad_token_id=PAD)
    model = GPT2LMHeadModel(config).to(torch.float64)
    with torch.no_grad():  # Move LayerNorms off their (1, 0) init so their gradients are generic.
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return model


class TinyLM(nn.Module):
    """Embedding (+ broadcast position embedding), LayerNorm, Linear and a causal running mean."""

    def __init__(self, vocab: int = 23, dim: int = 8, tied: bool = False, padding_idx=None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.pos = nn.Embedding(SEQ, dim)
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(2 * dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight
        with torch.no_grad():  # Generic values everywhere, padding row included.
            for p in self.parameters():
                p.copy_(0.5 * torch.randn_like(p))

    def forward(self, input_ids: Tensor, attention_mask: Tensor = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h = self.emb(input_ids) + self.pos(positions)
        h = self.out(torch.tanh(self.hidden(self.norm(h))))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(h.cumsum(1) / steps)


def classifier_loss(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction='none')


@pytest.fixture(scope='module')
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture(scope='module')
def probe() -> Dict[str, Tensor]:
    return lm_batch(20, seed=1)


@pytest.fixture(scope='module')
def reference() -> Dict[str, Tensor]:
    return lm_batch(6, seed=2)


# --------------------------------------------------------------------------------------------------
# Correctness.


def test_gpt2_is_fully_covered(gpt2: nn.Module) -> None:
    covered = covered_parameters(gpt2)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert len(covered) == len(list(gpt2.parameters())) == 2 + 12 * 2 + 2  # wte/wpe, blocks, ln_f.
    assert set(covered) == set(gpt2.parameters())


def test_gpt2_matches_brute_force(gpt2: nn.Module, probe, reference) -> None:
    grads = reference_gradient(gpt2, reference)
    expected = plain_reference_gradient(gpt2, reference, list(grads))
    for (param, grad), plain in zip(grads.items(), expected):
        assert grad.shape == param.shape and not grad.requires_grad
        torch.testing.assert_close(grad, plain, rtol=1e-12, atol=1e-15)
    ghost = per_sample_influence(gpt2, probe, grads, verify=True)
    assert ghost.dtype == torch.float64 and ghost.device.type == 'cpu' and ghost.shape == (20,)
    assert_close_to_brute(ghost, brute_force(gpt2, probe, grads))


def test_gpt2_without_labels_uses_attention_mask(gpt2: nn.Module, reference) -> None:
    probe = lm_batch(8, seed=3, labels=False)
    grads = reference_gradient(gpt2, reference)
    assert_close_to_brute(per_sample_influence(gpt2, probe, grads), brute_force(gpt2, probe, grads))


def test_padding_and_batch_composition_do_not_matter(gpt2: nn.Module, probe, reference) -> None:
    grads = reference_gradient(gpt2, reference)
    base = per_sample_influence(gpt2, probe, grads)
    # Same samples, reversed and right-padded further (only right-padded rows are padded again).
    order = torch.arange(20).flip(0)
    extra = 4
    padded = {
        'input_ids': F.pad(probe['input_ids'][order], (0, extra), value=PAD),
        'attention_mask': F.pad(probe['attention_mask'][order], (0, extra), value=0),
        'labels': F.pad(probe['labels'][order], (0, extra), value=-100),
    }
    again = per_sample_influence(gpt2, padded, grads)
    torch.testing.assert_close(again, base[order], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize('tied,padding_idx', [(False, None), (True, None), (True, 0)])
def test_custom_embedding_linear_layernorm(tied: bool, padding_idx) -> None:
    torch.manual_seed(4)
    model = TinyLM(tied=tied, padding_idx=padding_idx).to(torch.float64)
    assert (model.head.weight is model.emb.weight) == tied
    assert set(covered_parameters(model)) == set(model.parameters())
    probe = lm_batch(16, seed=5, vocab=23)  # PAD = 0 = padding_idx in the padded positions.
    probe['input_ids'][::2, 1] = 0  # ... and in positions that count: no embedding gradient there.
    probe['labels'][::2, 1] = 0
    reference = lm_batch(4, seed=6, vocab=23)
    grads = reference_gradient(model, reference)
    if padding_idx is not None:
        assert float(grads[model.emb.weight][padding_idx].abs().sum()) > 0  # From the tied head.
    ghost = compute_influence(model, probe, reference, verify=True)
    assert_close_to_brute(ghost, brute_force(model, probe, grads))


class SharedEmbedding(nn.Embedding):
    """llm-foundry's tied embedding: ``unembed=True`` reuses the matrix as the output layer."""

    def forward(self, input: Tensor, unembed: bool = False) -> Tensor:
        return F.linear(input, self.weight) if unembed else super().forward(input)


class SharedEmbeddingLM(nn.Module):
    def __init__(self, vocab: int = 23, dim: int = 8) -> None:
        super().__init__()
        self.wte = SharedEmbedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor = None) -> Tensor:
        h = torch.tanh(self.mlp(self.norm(self.wte(input_ids))))
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.wte(h.cumsum(1) / steps, unembed=True)


def test_shared_embedding_called_as_output_layer() -> None:
    torch.manual_seed(7)
    model = SharedEmbeddingLM().to(torch.float64)
    assert set(covered_parameters(model)) == set(model.parameters())
    probe = lm_batch(16, seed=8, vocab=23)
    reference = lm_batch(4, seed=9, vocab=23)
    grads = reference_gradient(model, reference)
    ghost = compute_influence(model, probe, reference, verify=True)
    assert_close_to_brute(ghost, brute_force(model, probe, grads))


def test_custom_loss_adapter_and_2d_activations() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).double()
    probe = (torch.randn(17, 5, dtype=torch.float64), torch.randint(0, 3, (17,)))
    reference = (torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,)))
    grads = reference_gradient(model, reference, classifier_loss)
    ghost = per_sample_influence(model, probe, grads, classifier_loss, verify=True)
    assert_close_to_brute(ghost, brute_force(model, probe, grads, classifier_loss))


def test_embedding_of_one_token_per_sample() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    probe = (torch.randint(0, 10, (12,)), torch.randint(0, 3, (12,)))
    reference = (torch.randint(0, 10, (5,)), torch.randint(0, 3, (5,)))
    grads = reference_gradient(model, reference, classifier_loss)
    ghost = per_sample_influence(model, probe, grads, classifier_loss, verify=True)
    assert_close_to_brute(ghost, brute_force(model, probe, grads, classifier_loss))


def test_parameter_subset(gpt2: nn.Module, probe, reference) -> None:
    subset = [gpt2.transformer.wte.weight, gpt2.transformer.h[1].mlp.c_fc.weight,
              gpt2.transformer.h[0].attn.c_attn.bias, gpt2.transformer.ln_f.weight]
    grads = reference_gradient(gpt2, reference, params=subset)
    assert list(grads) == subset
    ghost = compute_influence(gpt2, probe, reference, params=subset)
    assert_close_to_brute(ghost, brute_force(gpt2, probe, grads))
    # A precomputed reference gradient gives the same answer.
    torch.testing.assert_close(compute_influence(gpt2, probe, reference_grad=grads), ghost,
                               rtol=0, atol=0)


def test_sign_of_identical_sample(gpt2: nn.Module, probe) -> None:
    reference = _slice(probe, 5)
    grads = reference_gradient(gpt2, reference)
    influence = compute_influence(gpt2, probe, reference)
    squared_norm = sum(float((g * g).sum()) for g in grads.values())
    assert influence[5] > 0
    assert float(influence[5]) == pytest.approx(squared_norm, rel=1e-9)


def test_float32_model_is_close() -> None:
    model = make_gpt2(seed=8).float()
    probe, reference = lm_batch(8, seed=9), lm_batch(4, seed=10)
    grads = reference_gradient(model, reference)
    ghost = per_sample_influence(model, probe, grads, verify=True)
    assert ghost.dtype == torch.float32
    assert_close_to_brute(ghost, brute_force(model, probe, grads), rtol=1e-3)


# --------------------------------------------------------------------------------------------------
# No side effects.


def test_state_is_preserved(probe, reference) -> None:
    model = make_gpt2(seed=11)
    model.train()
    model.transformer.h[0].eval()  # Mixed modes must be restored module by module.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    causal_lm_per_sample_loss(model, reference).mean().backward()
    optimizer.step()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i % 3 else torch.zeros_like(p)
    params[4].grad = None

    before_params = [p.detach().clone() for p in params]
    before_grads = [None if p.grad is None else (p.grad, p.grad.clone()) for p in params]
    before_opt = copy.deepcopy(optimizer.state_dict())
    before_modes = {name: m.training for name, m in model.named_modules()}
    before_rng = torch.get_rng_state()

    def noisy_loss(model: nn.Module, batch) -> Tensor:
        torch.rand(3)  # Consumes the RNG: it must be restored anyway.
        return causal_lm_per_sample_loss(model, batch)

    influence = compute_influence(model, probe, reference, noisy_loss, verify=True)
    assert torch.isfinite(influence).all()

    for p, old in zip(params, before_params):
        assert torch.equal(p, old)
    for p, old in zip(params, before_grads):
        if old is None:
            assert p.grad is None
        else:
            assert p.grad is old[0] and torch.equal(p.grad, old[1])
    after_opt = optimizer.state_dict()
    assert after_opt['param_groups'] == before_opt['param_groups']
    assert after_opt['state'].keys() == before_opt['state'].keys()
    for key, state in before_opt['state'].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(after_opt['state'][key][name]), torch.as_tensor(value))
    assert {name: m.training for name, m in model.named_modules()} == before_modes
    assert torch.equal(torch.get_rng_state(), before_rng)


def test_dropout_does_not_make_it_random(probe, reference) -> None:
    model = make_gpt2(seed=12).train()
    first = compute_influence(model, probe, reference)
    torch.rand(5)
    second = compute_influence(model, probe, reference)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Wrappers.


def test_composer_huggingface_wrapper(gpt2: nn.Module, probe, reference) -> None:
    from composer.models import HuggingFaceModel
    wrapper = HuggingFaceModel(gpt2, tokenizer=None, use_logits=True)
    assert set(covered_parameters(wrapper)) == set(gpt2.parameters())
    training = gpt2.training
    gpt2.eval()  # No dropout for the direct comparison of the losses.
    try:
        torch.testing.assert_close(causal_lm_per_sample_loss(wrapper, probe),
                                   causal_lm_per_sample_loss(gpt2, probe), rtol=0, atol=0)
    finally:
        gpt2.train(training)
    via_wrapper = compute_influence(wrapper, probe, reference)
    direct = compute_influence(gpt2, probe, reference)
    torch.testing.assert_close(via_wrapper, direct, rtol=1e-12, atol=1e-15)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world_size)
    try:
        torch.manual_seed(13)
        model = TinyLM(tied=True).double()
        reference = lm_batch(3, seed=100 + rank, vocab=23)
        probe = lm_batch(5, seed=200, vocab=23)
        grads = reference_gradient(model, reference)
        ddp = nn.parallel.DistributedDataParallel(model)
        influence = compute_influence(ddp, probe, reference_grad=grads)
        assert all(p.grad is None for p in model.parameters())  # DDP never synced or wrote grads.
        torch.save({'grads': [g for g in grads.values()], 'influence': influence},
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_reference_gradient_is_averaged_across_ranks() -> None:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, 'init'), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f'rank{r}.pt')) for r in range(2)]
    torch.manual_seed(13)
    model = TinyLM(tied=True).double()
    params = covered_parameters(model)
    per_rank = [plain_reference_gradient(model, lm_batch(3, seed=100 + r, vocab=23), params)
                for r in range(2)]
    for i, param in enumerate(params):
        mean = (per_rank[0][i] + per_rank[1][i]) / 2
        for result in results:
            torch.testing.assert_close(result['grads'][i], mean, rtol=1e-12, atol=1e-15)
    grads = dict(zip(params, [(a + b) / 2 for a, b in zip(*per_rank)]))
    probe = lm_batch(5, seed=200, vocab=23)
    expected = brute_force(model, probe, grads)
    for result in results:
        assert_close_to_brute(result['influence'], expected)


# --------------------------------------------------------------------------------------------------
# Unsupported cases.


class FunctionalTie(nn.Module):
    """Uses the embedding matrix functionally as the output layer: invisible to module hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)

    def forward(self, input_ids: Tensor, attention_mask: Tensor = None) -> Tensor:
        return F.linear(torch.tanh(self.proj(self.emb(input_ids))), self.emb.weight)


class FunctionalOnly(nn.Module):
    """Owns a Linear but only ever uses its weight through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 11)

    def forward(self, input_ids: Tensor, attention_mask: Tensor = None) -> Tensor:
        return F.linear(self.emb(input_ids), self.proj.weight, self.proj.bias)


class InPlaceAfterLinear(nn.Module):

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 11)

    def forward(self, input_ids: Tensor, attention_mask: Tensor = None) -> Tensor:
        logits = self.proj(self.emb(input_ids))
        logits += 1.0  # Changes the recorded output after the module returned.
        return logits


def test_unsupported_cases_raise() -> None:
    batch = lm_batch(4, seed=14, vocab=11)
    conv = nn.Sequential(nn.Conv1d(2, 2, 1))
    with pytest.raises(InfluenceError, match='no parameter covered'):
        reference_gradient(conv, (torch.randn(3, 2, 4),), lambda m, b: m(b[0]).sum((1, 2)))
    frozen = TinyLM().requires_grad_(False)
    with pytest.raises(InfluenceError, match='no parameter covered'):
        compute_influence(frozen, batch, batch)
    with pytest.raises(InfluenceError, match='not covered'):
        reference_gradient(TinyLM(), batch, params=[conv[0].weight])
    with pytest.raises(InfluenceError, match='max_norm'):
        model = TinyLM()
        model.emb.max_norm = 1.0
        compute_influence(model, batch, batch)
    with pytest.raises(InfluenceError, match='1-D'):
        reference_gradient(TinyLM(), batch, lambda m, b: causal_lm_per_sample_loss(m, b).mean())
    with pytest.raises(InfluenceError, match='does not add up'):
        compute_influence(FunctionalTie().double(), batch, batch, verify=True)
    with pytest.raises(InfluenceError, match='functionally'):
        compute_influence(FunctionalOnly().double(), batch, batch)
    with pytest.raises(InfluenceError, match='in place'):
        compute_influence(InPlaceAfterLinear().double(), batch, batch)
    with pytest.raises(InfluenceError, match='reference_batch'):
        compute_influence(TinyLM(), batch)


def brute_force_norms(model: nn.Module, batch: Any, params: Sequence[nn.Parameter]) -> Tensor:
    """Each sample's gradient norm over ``params``, one backward per sample run alone."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = []
        for i in range(_num_samples(batch)):
            loss = causal_lm_per_sample_loss(model, _slice(batch, i))[0]
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            out.append(torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None)))
    finally:
        for m, t in modes:
            m.training = t
    return torch.stack(out)


@pytest.mark.parametrize('kind', ['gpt2', 'tied', 'untied', 'shared-embedding'])
def test_gradient_norms_for_the_cosine_reward(kind: str) -> None:
    torch.manual_seed(11)
    model = {'gpt2': lambda: make_gpt2(seed=3), 'tied': lambda: TinyLM(tied=True, padding_idx=0),
             'untied': lambda: TinyLM(tied=False),
             'shared-embedding': SharedEmbeddingLM}[kind]().to(torch.float64)
    vocab = model.config.vocab_size if kind == 'gpt2' else 23
    probe = lm_batch(6, seed=12, vocab=vocab)
    grads = reference_gradient(model, lm_batch(3, seed=13, vocab=vocab))
    inner, norms = compute_influence(model, probe, reference_grad=grads, return_norms=True,
                                     micro_batch=4)
    torch.testing.assert_close(inner, compute_influence(model, probe, reference_grad=grads))
    expected = brute_force_norms(model, probe, list(grads))
    torch.testing.assert_close(norms.double(), expected, rtol=1e-9, atol=1e-12)
    # The cosine is a cosine: |<g, G>| <= |g| |G|, with equality for a probe equal to the reference.
    g_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    assert torch.all(inner.abs() <= norms * g_norm * (1 + 1e-9))
