"""lean_kernels.py: the custom autograd Functions (the fused output layer and loss, GELU + Linear)
against plain autograd and gradcheck in float64; and the loss under no_grad doing only forward work."""
import pytest
import torch
import torch.nn.functional as F

from lean_kernels import GeluLinear, LinearCrossEntropy
from model import GPT, GPTConfig


def ce_inputs(rows=13, dim=6, vocab=11, seed=0):
    """Rows of hidden states, the output matrix and targets; two targets ignored (-1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[[2, 7]] = -1
    return x, w, t


def test_linear_cross_entropy_passes_gradcheck():
    x, w, t = ce_inputs()
    # chunk 4 over 13 rows: three full chunks and a partial one, as the real loss runs
    assert torch.autograd.gradcheck(lambda x, w: LinearCrossEntropy.apply(x, w, t, 4, True), (x, w))


def test_linear_cross_entropy_equals_f_cross_entropy_over_plain_logits():
    x, w, t = ce_inputs()
    loss = LinearCrossEntropy.apply(x, w, t, 4, True)
    gx, gw = torch.autograd.grad(loss, (x, w))
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-1)
    rx, rw = torch.autograd.grad(ref, (x, w))
    # float64: only summation order differs, ~1e-16 relative; 1e-12 leaves room and catches any real error
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


def test_loss_under_no_grad_does_only_the_forward_work():
    # evaluation (eval.py, train.py's estimate_loss) runs the loss under no_grad: the output layer's
    # gradients must not be computed there (they were, tripling the cost of a full-pass evaluation)
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=5000, dropout=0.0), verbose=False)
    x, y = torch.randint(0, 5000, (4, 16)), torch.randint(0, 5000, (4, 16))
    flops = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            loss = model(x, y)[1]
        flops[grad] = counter.get_total_flops()
    head = 2 * 64 * 32 * 5000  # one forward matmul through the 5000-token output layer
    # with grad: the head's forward and grad_x matmuls (the counter skips the in-place addmm_ for grad_w)
    assert flops[False] < 1.5 * head < 2 * head < flops[True]
    with torch.no_grad():
        torch.testing.assert_close(model(x, y)[1], loss, rtol=0, atol=0)


@pytest.mark.parametrize('bias', [True, False])
def test_gelu_linear_passes_gradcheck_and_equals_plain_autograd(bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (h, w, b) if bias else (h, w)
    assert torch.autograd.gradcheck(lambda h, w, b=None: GeluLinear.apply(h, w, b), inputs)
    out = GeluLinear.apply(h, w, b)
    ref = F.linear(F.gelu(h), w, b)
    assert torch.equal(out, ref)  # the same forward ops
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(out, inputs, probe), torch.autograd.grad(ref, inputs, probe)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
