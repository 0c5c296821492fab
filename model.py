"""
The SLM language model: a GPT-2-shaped decoder-only transformer.

Parameter names follow GPT-2/nanoGPT (transformer.wte, transformer.h.N.attn.c_attn, ...)
so weights map 1:1 onto GPT-2 layouts. Pre-LayerNorm blocks, causal attention through
F.scaled_dot_product_attention, exact-GELU MLP, input/output embeddings tied.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE via tiktoken
    block_size: int = 128    # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    bias: bool = True        # biases in Linear and LayerNorm, as GPT-2


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact erf GELU (HF's "gelu"), not the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) against targets, computed chunk by chunk.

    A (B*T, 50257) fp32 logits tensor is 823 MB at batch 32 x 128, and autograd would
    keep it and its softmax alive until backward. Here each chunk's logits are made,
    turned into loss and into the gradients for x and weight right away, and freed;
    backward only scales the stored gradients. Same FLOPs, a fraction of the memory.
    Targets equal to -1 are ignored.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size):
        # autocast does not reach inside a Function: cast to its dtype by hand, keep softmax in fp32
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
            valid = targets != -1
            n_valid = valid.sum().clamp(min=1)
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # bf16/fp16 -> fp32
            loss_sum = torch.zeros((), dtype=acc_dtype, device=x.device)
            grad_x = torch.zeros_like(x) if needs_grad else None
            grad_w = torch.zeros_like(weight, dtype=acc_dtype) if needs_grad else None
            for s in range(0, x.shape[0], chunk_size):
                xs, ts, vs = xc[s:s + chunk_size], targets[s:s + chunk_size], valid[s:s + chunk_size]
                logits = (xs @ wc.t()).to(acc_dtype)
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, ts.clamp(min=0).unsqueeze(1)).squeeze(1)
                loss_sum += ((lse - target_logit) * vs).sum()
                if needs_grad:
                    # d loss / d logits = softmax - onehot, built in place in the logits buffer
                    probs = logits.sub_(lse.unsqueeze(1)).exp_()
                    rows = torch.arange(len(ts), device=x.device)
                    probs[rows, ts.clamp(min=0)] -= 1.0
                    probs.mul_(vs.unsqueeze(1))
                    g = probs.to(compute_dtype)
                    grad_x[s:s + chunk_size] = (g @ wc).to(x.dtype)
                    if g.dtype == grad_w.dtype:
                        grad_w.addmm_(g.t(), xs)
                    else:
                        grad_w.add_((g.t() @ xs).to(acc_dtype))
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if needs_grad else None, n_valid)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gx = grad_x * scale.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * scale.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None


class GPT(nn.Module):

    def __init__(self, config, verbose=True):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.ce_chunk_size = 1024  # rows of logits alive at once in the training loss

        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if verbose:
            print(f"number of parameters: {self.get_num_params(non_embedding=False) / 1e6:.2f}M total, "
                  f"{self.get_num_params() / 1e6:.2f}M non-embedding")

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the token and position tables."""
        n_params = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if non_embedding:
            n_params -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """Training (targets given): (None, mean loss). Inference: (last position's logits, None)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            loss = LinearCrossEntropy.apply(x.view(-1, x.size(-1)), self.lm_head.weight,
                                            targets.reshape(-1), self.ce_chunk_size)
            return None, loss
        return self.lm_head(x[:, [-1], :]), None  # only the last position is needed to sample

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay only on matrices and embeddings (>= 2-D), fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        extra = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self):
        """Model FLOPs per trained token (forward + backward), as in the PaLM paper / nanoGPT:
        6 * N for the weight matmuls (N = all parameters but the position table, the tied
        embedding counted once as the output layer) + 12 * n_layer * n_embd * block_size
        for attention scores and their weighted sums."""
        cfg = self.config
        N = self.get_num_params(non_embedding=False) - self.transformer.wpe.weight.numel()
        return 6 * N + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilization: achieved model FLOP/s over the given peak FLOP/s."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops
