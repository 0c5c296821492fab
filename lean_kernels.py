"""
The custom autograd kernels model.py trains with: each computes what the plain PyTorch named in
its docstring computes (tests/test_model.py and test_train.py check the numbers and gradients),
keeping less alive for backward. model.py chooses them in one place, its imports.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Dropout(nn.Dropout):
    """nn.Dropout keeping a 1-byte mask for backward on CPU, where F.dropout keeps a float32
    noise tensor (4x the memory); native_dropout is what CUDA runs for F.dropout anyway.
    Off (eval, p = 0) it returns x at once: ~10 us saved per call, 13 calls per decoding step."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type == 'cpu':
            return torch.native_dropout(x, self.p, True)[0]
        return super().forward(x)


class GeluLinear(torch.autograd.Function):
    """F.linear(gelu(h), weight, bias), keeping only h for backward and recomputing gelu(h)
    there. Plain autograd keeps both h and gelu(h): two (B, T, 4C) tensors per layer, the
    largest activations. The GELU is the exact erf one (HF's "gelu"), not GPT-2's tanh."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors  # under autocast h and grad_out are bf16/fp16, weight fp32
        a = F.gelu(h)
        grad_a = grad_out @ weight.to(grad_out.dtype)
        grad_h = torch.ops.aten.gelu_backward(grad_a.to(h.dtype), h)  # the kernel autograd's GELU runs
        rows = grad_out.reshape(-1, grad_out.size(-1))
        grad_w = (rows.t() @ a.reshape(-1, a.size(-1)).to(rows.dtype)).to(weight.dtype)
        grad_b = None if ctx.bias_dtype is None else rows.sum(0).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) against targets, computed chunk by chunk.

    A (B*T, 50257) fp32 logits tensor is 823 MB at batch 32 x 128, and autograd would
    keep it and its softmax alive until backward. Here each chunk's logits are made,
    turned into loss and into the gradients for x and weight right away, and freed;
    backward only scales the stored gradients. Same FLOPs, a fraction of the memory.
    Targets equal to -1 are ignored.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, grad_enabled):
        # autocast does not reach inside a Function: cast to its dtype by hand, keep softmax in fp32
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # needs_input_grad is True for the weights even under no_grad (evaluation): ask the caller's grad
        # mode too, or a forward-only pass would also compute the gradients (3x the work)
        needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
            valid = targets != -1
            targets = targets.clamp(min=0)
            n_valid = valid.sum().clamp(min=1)
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # bf16/fp16 -> fp32
            loss_sum = torch.zeros((), dtype=acc_dtype, device=x.device)
            grad_x = torch.empty_like(x) if needs_grad else None  # every row is written below
            grad_w = torch.zeros_like(weight, dtype=acc_dtype) if needs_grad else None
            # one logits buffer for all chunks: no per-chunk allocation (on CPU each fresh
            # 100+ MB buffer costs ~25k page faults), and softmax is built in it in place
            buf = torch.empty(min(chunk_size, x.shape[0]), weight.shape[0], dtype=acc_dtype, device=x.device)
            # under bf16/fp16 the matmuls write into their own reused buffers too
            low = None if compute_dtype == acc_dtype else torch.empty_like(buf, dtype=compute_dtype)
            low_w = None if low is None or not needs_grad else torch.empty_like(weight, dtype=compute_dtype)
            for s in range(0, x.shape[0], chunk_size):
                xs, ts, vs = xc[s:s + chunk_size], targets[s:s + chunk_size], valid[s:s + chunk_size]
                logits = buf[:len(xs)]
                if low is None:
                    torch.mm(xs, wc.t(), out=logits)
                else:
                    logits.copy_(torch.mm(xs, wc.t(), out=low[:len(xs)]))
                target_logit = logits.gather(1, ts.unsqueeze(1)).squeeze(1)
                maxes = logits.amax(dim=1, keepdim=True)
                sumexp = logits.sub_(maxes).exp_().sum(dim=1)  # logits now hold exp(logit - max)
                lse = maxes.squeeze(1) + sumexp.log()
                loss_sum += ((lse - target_logit) * vs).sum()
                if needs_grad:
                    # d loss / d logits = softmax - onehot (zero on ignored rows), in place
                    probs = logits.mul_((vs / sumexp).unsqueeze(1))
                    rows = torch.arange(len(ts), device=x.device)
                    probs[rows, ts] -= vs.to(probs.dtype)
                    g = probs if low is None else low[:len(xs)].copy_(probs)
                    grad_x[s:s + chunk_size] = (g @ wc).to(x.dtype)
                    if low is None:
                        grad_w.addmm_(g.t(), xs)
                    else:
                        grad_w.add_(torch.mm(g.t(), xs, out=low_w))
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if needs_grad else None, n_valid)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gx = grad_x * scale.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * scale.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None
