"""
Muon for the hidden matrices, AdamW for the rest, in one optimizer (train.py's --optimizer=muon).

Muon (Keller Jordan, 2024; modded-nanogpt, nanochat, Moonlight arXiv 2502.16982) keeps a
momentum of each matrix's gradient, like SGD, and then replaces the update by the nearest
semi-orthogonal matrix (U V^T of its SVD, approximated by five Newton-Schulz iterations): every
direction of the update moves by about the same amount, however small its gradient was. It
suits the 2-D weights inside the blocks; the embeddings (and so the tied output layer), biases
and LayerNorm gains keep AdamW. One optimizer object for both: one state_dict for ckpt.pt, and
the fp16 GradScaler skips the whole step (both kinds) when any gradient overflowed.
"""
import torch

from device import cpu_has_bf16_matmul


def orthogonalize(g, steps=5, dtype=torch.bfloat16):
    """About U V^T for g = U S V^T, batched over leading dims: a quintic Newton-Schulz iteration
    whose coefficients (Keller Jordan's) push the singular values of the normalized g into a band
    around 1 (about 0.7 to 1.2) in five steps, those down to ~1e-2 of the largest included (the
    near-null directions of a gradient stay small); matmuls only, so they can run in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1, where it converges
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return (x if wide else x.mT).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """param groups with muon=True: momentum, orthogonalized (a group's split: that many matrices
    stacked along dim 0, each on its own, as q, k and v in c_attn), scaled by sqrt(max(1, rows /
    cols)) so tall and wide matrices move alike, decoupled weight decay. The other groups: AdamW.
    Each group's lr is set by train.py every step (its schedule times the group's lr_ratio)."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_dtype=None):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0,
                                      muon=False, split=1))
        # Newton-Schulz in bf16 where matmuls run it in hardware (GPUs; CPUs with AVX512-BF16 or
        # AMX), else fp32, which is faster than emulated bf16
        on_gpu = any(p.is_cuda for group in self.param_groups for p in group['params'])
        self.ns_dtype = ns_dtype or (torch.bfloat16 if on_gpu or cpu_has_bf16_matmul() else torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in (p for p in group['params'] if p.grad is not None):
                p.mul_(1 - group['lr'] * group['weight_decay'])
                if group['muon']:
                    self.muon_update(p, group)
                else:
                    self.adamw_update(p, group)

    def muon_update(self, p, group):
        state = self.state[p]
        if not state:
            state['momentum'] = torch.zeros_like(p)
        m = state['momentum'].lerp_(p.grad, 1 - group['momentum'])
        g = p.grad.lerp(m, group['momentum'])  # Nesterov: the gradient, then the momentum's next step
        g = orthogonalize(g.view(group['split'], -1, g.size(-1)), dtype=self.ns_dtype).view_as(p)
        p.add_(g, alpha=-group['lr'] * max(1, g.size(0) / group['split'] / g.size(1)) ** 0.5)

    def adamw_update(self, p, group):
        state = self.state[p]
        if not state:
            state['step'], state['exp_avg'], state['exp_avg_sq'] = 0, torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = group['betas']
        state['step'] = t = state['step'] + 1
        state['exp_avg'].lerp_(p.grad, 1 - beta1)
        state['exp_avg_sq'].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state['exp_avg_sq'] / (1 - beta2 ** t)).sqrt_().add_(group['eps'])
        p.addcdiv_(state['exp_avg'], denom, value=-group['lr'] / (1 - beta1 ** t))
