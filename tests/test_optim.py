"""optim.py: Muon for the hidden matrices, AdamW for the rest (train.py's --optimizer=muon)."""
import copy

import pytest
import torch

import train
from model import GPT, GPTConfig
from optim import MuonAdamW, orthogonalize

MUON = dict(lr=0.02, momentum=0.95, weight_decay=0.01)


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0), verbose=False)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    """Every parameter is in exactly one group; Muon's are the 2-D weights inside the blocks, c_attn's
    as three matrices (q, k, v); the embeddings (so the tied output layer), biases and norms are AdamW's."""
    m = small_gpt()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', MUON)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    seen = [names[id(p)] for g in opt.param_groups for p in g['params']]
    assert sorted(seen) == sorted(names.values())  # each parameter once (wte is lm_head: tied)
    muon = {names[id(p)]: g for g in opt.param_groups if g['muon'] for p in g['params']}
    hidden = [n for n, p in m.named_parameters() if n.startswith('transformer.h.') and p.dim() == 2]
    assert sorted(muon) == sorted(hidden) and len(hidden) == 2 * 4
    assert all(g['split'] == (3 if n.endswith('attn.c_attn.weight') else 1) for n, g in muon.items())
    assert all(g['lr_ratio'] == pytest.approx(0.02 / 1e-3) and g['weight_decay'] == 0.01 for g in muon.values())
    adamw = {names[id(p)]: g['weight_decay'] for g in opt.param_groups if not g['muon'] for p in g['params']}
    assert adamw['transformer.wte.weight'] == adamw['transformer.wpe.weight'] == 0.1
    assert all(wd == 0.0 for n, wd in adamw.items() if n.endswith('.bias') or '.ln_' in n)
    # without muon: torch's AdamW, as before
    assert type(m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')) is torch.optim.AdamW


@pytest.mark.parametrize('shape', [(64, 32), (32, 96), (3, 32, 32)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_an_orthogonalized_update_has_singular_values_near_one(shape, dtype):
    """Newton-Schulz's band: every singular value of the update within [0.5, 1.5], however unequal
    they were (here over two orders of magnitude; five steps do not lift directions below ~1e-3 of
    the largest, the near-null directions of a real gradient, which stay small)."""
    torch.manual_seed(0)
    u, _, v = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    s = torch.logspace(0, -2, u.size(-1)).expand(*shape[:-2], -1)
    g = u @ torch.diag_embed(s) @ v
    sv = torch.linalg.svdvals(orthogonalize(g, dtype=dtype).float())
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())


def test_q_k_and_v_are_orthogonalized_as_separate_matrices():
    """The first Muon step moves c_attn by lr times each of q, k and v's gradients orthogonalized
    on its own (the first step's Nesterov momentum is the gradient, scaled)."""
    m = small_gpt()
    opt = m.configure_optimizers(0.0, 1e-3, (0.9, 0.95), 'cpu', {**MUON, 'weight_decay': 0.0})
    w = m.transformer.h[0].attn.c_attn.weight
    before = w.detach().clone()
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    for group in opt.param_groups:
        group['lr'] = 1e-3 * group.get('lr_ratio', 1.0)
    opt.step()
    C = w.size(1)
    nesterov = w.grad.lerp(torch.zeros_like(w).lerp_(w.grad, 0.05), 0.95)  # as the first step makes it
    expected = torch.cat([orthogonalize(g, dtype=opt.ns_dtype) for g in nesterov.split(C)])
    assert torch.allclose(before - w.detach(), 0.02 * expected, atol=1e-6)
    fused = orthogonalize(nesterov, dtype=opt.ns_dtype)  # c_attn as one matrix moves otherwise
    assert not torch.allclose(before - w.detach(), 0.02 * fused * 3 ** 0.5, atol=1e-3)


def test_adamw_inside_muon_equals_torch_adamw():
    """The AdamW half of MuonAdamW is AdamW: the same weights as torch.optim.AdamW after 5 steps."""
    a, b = small_gpt(), small_gpt()
    opt_a = torch.optim.AdamW([{'params': list(a.parameters()), 'weight_decay': 0.1}], lr=1e-3, betas=(0.9, 0.95))
    opt_b = MuonAdamW([{'params': list(b.parameters()), 'weight_decay': 0.1}], lr=1e-3, betas=(0.9, 0.95))
    for step in range(5):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in a.parameters()]
        for model, opt in ((a, opt_a), (b, opt_b)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_grad_scaler_skips_a_step_whose_gradients_overflow(optimizer):
    """train_step with the fp16 GradScaler: a step with inf gradients (in a matrix Muon moves)
    leaves every weight and all optimizer state untouched, AdamW's and Muon's, and halves the
    scale; the next good step trains again."""
    m = small_gpt()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', MUON if optimizer == 'muon' else None)
    scaler = torch.amp.GradScaler('cpu', enabled=True)  # as train.py makes it for float16
    ctx = train.autocast('cpu', 'float16')
    batch = [(torch.randint(0, 512, (4, 16)), torch.randint(0, 512, (4, 16)))]

    def snapshot():
        return [p.detach().clone() for p in m.parameters()], copy.deepcopy(opt.state_dict()['state'])

    def step():
        return train.train_step(m, opt, scaler, batch, 1e-3, 1.0, ctx)

    step()
    weights, state = snapshot()
    scale = scaler.get_scale()
    hook = m.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: torch.full_like(g, float('inf')))
    step()
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(weights, m.parameters())), "an overflowing step changed weights"
    after = opt.state_dict()['state']
    assert state.keys() == after.keys()
    assert all(torch.equal(torch.as_tensor(state[i][k]), torch.as_tensor(after[i][k])) for i in state for k in state[i])
    assert scaler.get_scale() == scale / 2
    step()
    assert not all(torch.equal(a, b) for a, b in zip(weights, m.parameters()))
