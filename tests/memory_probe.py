"""Peak memory of a training step and of the influence pass on the same model (run as a script).

Printed as JSON. Run in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` small, so glibc returns
every large tensor to the system when it is freed and the resident-set high-water mark
(:class:`streaming_mads.influence.memory.PeakMemory`) measures tensor memory exactly.
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Dict

import torch
from torch import Tensor

from streaming_mads.influence import PeakMemory, per_sample_influence, reference_gradient


def batch(num: int, seq: int, vocab: int, seed: int) -> Dict[str, Tensor]:
    ids = torch.randint(0, vocab, (num, seq), generator=torch.Generator().manual_seed(seed))
    return {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--n-layer', type=int, default=4)
    parser.add_argument('--n-embd', type=int, default=128)
    parser.add_argument('--vocab', type=int, default=512)
    parser.add_argument('--seq', type=int, default=512)
    parser.add_argument('--micro-batch', type=int, default=2)
    parser.add_argument('--samples', type=int, default=4, help='reference and probe samples')
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, vocab_size=args.vocab,
                        n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)  # No dropout: the same attention kernel in both passes.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_batch = batch(args.micro_batch, args.seq, args.vocab, 0)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        model(**step_batch).loss.backward()
        opt.step()

    train_step()  # Gradients and optimizer state exist, as at the end of a batch.
    reference = batch(args.samples, args.seq, args.vocab, 1)
    probes = batch(args.samples, args.seq, args.vocab, 2)
    cpu = torch.device('cpu')

    def influence(checkpoint: bool) -> None:
        grad = reference_gradient(model, reference, micro_batch=args.micro_batch,
                                  checkpoint=checkpoint)
        per_sample_influence(model, probes, grad, micro_batch=args.micro_batch,
                             checkpoint=checkpoint)

    out = {}
    for name, fn in [('train_step', train_step), ('influence', lambda: influence(True)),
                     ('influence_no_checkpointing', lambda: influence(False))]:
        gc.collect()
        with PeakMemory(cpu) as peak:
            fn()
        out[name] = peak.bytes
    out['parameters'] = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(out))


if __name__ == '__main__':
    main()
