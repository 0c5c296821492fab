"""
The SLM language model: a GPT-2-shaped decoder-only transformer.

Parameter names follow GPT-2/nanoGPT (transformer.wte, transformer.h.N.attn.c_attn, ...)
so weights map 1:1 onto GPT-2 layouts. Pre-LayerNorm blocks, causal attention through
F.scaled_dot_product_attention, exact-GELU MLP, input/output embeddings tied. One forward
serves training, evaluation and generation; below the model, generation (kv cache, window,
sampling, the streaming loop), then MKL's packed GEMM for decoding on x86 CPUs, optional.
"""
import contextlib
import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE via tiktoken
    block_size: int = 128    # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    bias: bool = True        # biases in Linear and LayerNorm, as GPT-2


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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None, pos=0, last_only=False):
        """x (B, T, C) holds positions pos..pos+T-1. kv_cache (generation): this layer's (k, v)
        buffers (B, nh, block_size, hs); x's keys and values are written at pos and x attends
        over every key cached up to its own. last_only: the output of the last position alone."""
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs): views, one op for all three
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache[:, :, pos:pos + T], v_cache[:, :, pos:pos + T] = k, v
            k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]
        if last_only:
            q = q[:, :, -1:]
        if self.training and self.dropout > 0 and x.device.type != 'cuda':
            # off CUDA, attention dropout sends SDPA to its math path, which keeps three
            # (B, nh, T, T) tensors per layer for backward: recompute them in backward
            # instead (checkpoint replays the same dropout mask), ~1% more work
            y = checkpoint(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                           dropout_p=self.dropout, use_reentrant=False)
        else:
            # T queries over T keys (training, a prompt at pos 0) need the causal mask; a single
            # query (a decoding step, last_only) sees every key there is
            y = F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, q.size(2), C)
        return self.resid_dropout(self.c_proj(y))


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


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if torch.is_grad_enabled():  # training: keep only h for backward
            return self.dropout(GeluLinear.apply(h, self.c_proj.weight, self.c_proj.bias))
        return self.dropout(self.c_proj(F.gelu(h)))  # the same numbers, nothing kept


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, pos=0, last_only=False):
        attended = self.attn(self.ln_1(x), kv_cache, pos, last_only)  # see CausalSelfAttention.forward
        x = (x[:, -1:] if last_only else x) + attended
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


class GPT(nn.Module):

    def __init__(self, config, verbose=True):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.ce_chunk_size = 512  # rows of logits alive at once in the training loss (100 MB fp32)

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

    def forward(self, idx, targets=None, kv_cache=None, pos=0):
        """idx (B, T): tokens at positions pos..pos+T-1. Training (targets given): (None, mean
        loss). Inference: (last position's logits (B, 1, vocab_size), None). kv_cache (generation,
        new_kv_cache): per layer the keys and values of the tokens before pos; idx's go in at pos."""
        B, T = idx.size()
        assert pos + T <= self.config.block_size, f"{pos + T} positions, block_size is {self.config.block_size}"
        assert kv_cache is None or T == 1 or pos == 0, "several tokens fill the cache from position 0"
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            # generation samples from the last position only: the last block computes it alone
            x = block(x, kv_cache[i], pos, last_only=i == len(kv_cache) - 1) if kv_cache else block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            loss = LinearCrossEntropy.apply(x.view(-1, x.size(-1)), self.lm_head.weight,
                                            targets.reshape(-1), self.ce_chunk_size, torch.is_grad_enabled())
            return None, loss
        return self.lm_head(x[:, [-1], :]), None  # only the last position is needed to sample

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay only on matrices and embeddings (>= 2-D). Fused on CUDA and CPU:
        one kernel per step instead of a loop of per-tensor ops, faster and with no
        parameter-sized temporaries (on CPU that is ~0.1 GB off the training step's peak)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        use_fused = device_type in ('cuda', 'cpu') and 'fused' in inspect.signature(torch.optim.AdamW).parameters
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

    # generate() and generate_stream(): at the end of this file, with the rest of generation


# -----------------------------------------------------------------------------
# generation: the kv cache, the window the model sees, the streaming loop, sampling

def new_kv_cache(model, batch_size):
    """Per layer a (k, v) pair of empty (batch_size, n_head, block_size, head_size) buffers,
    in the dtype the attention computes in (autocast's, if on)."""
    cfg, weight = model.config, model.lm_head.weight
    device_type = weight.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    return [(torch.empty(shape, dtype=dtype, device=weight.device),
             torch.empty(shape, dtype=dtype, device=weight.device)) for _ in range(cfg.n_layer)]


def window_steps(prompt_len, max_new_tokens, block_size, use_kv_cache=True, fast_window=False):
    """generate_stream's schedule (bench.py's speed limit counts it too): per step (run, pos), the
    model runs the last `run` tokens so far, the first at cache position pos. The model sees the
    last block_size tokens, as nanoGPT crops its context. Without the cache (nanoGPT's loop, the
    reference) every step runs that window; with it the prompt runs once, then one token per step.
    Once the window is full every position shifts by one each step (positions are learned and
    absolute), so the exact way re-runs the window every step; fast_window keeps its last
    block_size // 2 tokens and goes on one token per step: much faster, but a token then sees
    only block_size // 2 .. block_size tokens (README: its loss cost)."""
    n, pos = prompt_len, 0  # tokens so far; tokens held in the cache
    for _ in range(max_new_tokens):
        if not use_kv_cache:
            yield min(n, block_size), 0
        elif pos == 0 or pos == block_size:  # the prompt, or the window is full: refill the cache
            pos = min(n, block_size // 2 if fast_window and pos == block_size else block_size)
            yield pos, 0
        else:  # one new token at the next free position
            yield 1, pos
            pos += 1
        n += 1


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot_token=None,
                    use_kv_cache=True, fast_window=False, generator=None):
    """model.generate_stream: yield the next token of every row of idx (B, T), a (B,) tensor,
    step by step. use_kv_cache and fast_window: see window_steps. temperature 0 is greedy; see
    sample_logits for top_k and top_p. With eot_token, a row that has produced it yields
    eot_token from then on, and the stream ends once all have. The draws come from generator
    (a torch.Generator: serve.py's per request), else torch's global one. Call model.eval() first."""
    B, T = idx.shape
    if T == 0:
        raise ValueError("generate needs a prompt of at least one token (e.g. <|endoftext|>)")
    problem = sampling_problem(temperature, top_k, top_p)
    if problem:
        raise ValueError(problem)
    tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    tokens[:, :T] = idx
    n = T  # tokens so far
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    cache = new_kv_cache(model, B) if use_kv_cache else None
    packed = PackedLinears(model, B) if use_kv_cache else contextlib.nullcontext()  # optional (below)
    for run, pos in window_steps(T, max_new_tokens, model.config.block_size, use_kv_cache, fast_window):
        with packed:
            logits = model(tokens[:, n - run:n], kv_cache=cache, pos=pos)[0][:, -1]
        next_token = sample_logits(logits, temperature, top_k, top_p, generator)
        if eot_token is not None:
            next_token.masked_fill_(finished, eot_token)  # rows already done only pad
            finished |= next_token == eot_token
        tokens[:, n] = next_token
        n += 1
        yield next_token
        if eot_token is not None and finished.all():
            return


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot_token=None,
             use_kv_cache=True, fast_window=False):
    """model.generate: append up to max_new_tokens tokens to each row of idx (B, T) and return
    (B, T + n), as nanoGPT's generate. With eot_token, a row stops at its first eot_token and is
    padded with it while the others go on; generation ends once every row has stopped."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, eot_token,
                               use_kv_cache, fast_window))
    return torch.cat([idx] + [t.unsqueeze(1) for t in new], dim=1)


GPT.generate, GPT.generate_stream = generate, generate_stream  # methods, as nanoGPT's generate


def sampling_problem(temperature, top_k, top_p):
    """What is wrong with these sampling options, in one line, or None: the one rule that
    generate, sample.py, eval.py and bench.py all apply. top_k 0 or None and top_p 1 or None
    switch those filters off."""
    if not 0 <= temperature < math.inf:
        return f"temperature={temperature} must be a finite number >= 0 (0 = greedy; 0.8 is typical)"
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        return f"top_k={top_k!r} must be a whole number >= 1, or 0 / None for all tokens"
    if top_p is not None and not 0 < top_p <= 1:
        return f"top_p={top_p} must be in (0, 1], e.g. 0.9 (1.0 or None = off)"
    return None


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens and then to
    the nucleus: the fewest most-likely tokens whose probabilities add up to >= top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    nucleus = top_p is not None and top_p < 1.0
    if not top_k and not nucleus:  # top_k 0 or None: all tokens
        return draw(F.softmax(logits.float() / temperature, dim=-1), generator)
    if top_k:
        # the top_k are the same before and after dividing by temperature: divide only them
        top_logits, top_idx = torch.topk(logits, min(top_k, logits.size(-1)))  # most likely first
        probs = F.softmax(top_logits.float() / temperature, dim=-1)
    else:
        logits = logits.float() / temperature
        # sorting 50k probabilities takes milliseconds on a CPU, and the nucleus is nearly
        # always among the 1000 most likely tokens: sort all only when it is not
        probs = F.softmax(logits, dim=-1)
        top_probs, top_idx = torch.topk(probs, min(1000, probs.size(-1)))
        if (top_probs.sum(dim=-1) < top_p).any():
            top_probs, top_idx = torch.sort(probs, dim=-1, descending=True)
        probs = top_probs
    if nucleus:
        # drop a token once the more likely ones before it already reach top_p (keeps >= 1 token)
        probs[probs.cumsum(dim=-1) - probs >= top_p] = 0.0
    return top_idx.gather(-1, draw(probs, generator).unsqueeze(1)).squeeze(1)


def draw(probs, generator=None):
    """One index per row of probs (B, V), index i with probability probs[i] / probs.sum(),
    from generator (None: torch's global one).

    Inverse CDF: one uniform number per row. (torch.multinomial draws one exponential per
    entry: about 1 ms per token on a CPU over 50k tokens, a tenth of a generation step.)
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=total.dtype, device=total.device)
    u *= torch.nextafter(total, torch.zeros_like(total))  # in [0, total)
    # the first entry whose cdf exceeds u; zero-probability entries never are the first
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


# -----------------------------------------------------------------------------
# Optional: MKL's packed GEMM for decoding on x86 CPUs. Deleting this section, the two lines of
# generate_stream that use it and its imports leaves the same model and tokens, decoded slower.

MKL_PACKED_GEMM = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, '_mkl_linear')


class PackedLinears:
    """Within `with PackedLinears(model, batch_size):` model's Linear layers multiply through
    MKL's packed GEMM, as torch.compile's frozen CPU graphs do. Decoding multiplies a few rows by
    each weight, and plain MKL GEMM then re-lays the weight out on every call; a copy laid out
    once reads up to 1.5x faster (README: KV cache). Packed for batch_size rows (the one-token
    steps: every Linear and lm_head) and batch_size * block_size rows (the exact mode's window
    re-runs: the blocks' Linears). The copies (~180 MB at the seed config, ~0.1 s to make) stay
    on the model until a weight changes (an optimizer step or load_state_dict bumps its version).
    Off without MKL, off the CPU, unless float32, under CPU autocast, and after model.compile()."""

    def __init__(self, model, batch_size):
        self.forwards = {}  # layer: what runs instead of nn.Linear.forward within `with`
        weight = model.lm_head.weight
        if not (MKL_PACKED_GEMM and weight.device.type == 'cpu' and weight.dtype == torch.float32
                and not torch.is_autocast_enabled('cpu')
                and model._compiled_call_impl is None):  # model.compile(): compile cannot lower the op
            model._mkl_packed = None  # e.g. moved to a GPU: free the CPU copies
            return
        rows = {m: (batch_size, batch_size * model.config.block_size)
                for m in model.transformer.h.modules() if isinstance(m, nn.Linear)}
        rows[model.lm_head] = (batch_size,)
        key = [(m.weight.data_ptr(), m.weight._version, r) for m, r in rows.items()]
        if getattr(model, '_mkl_packed', None) is None or model._mkl_packed[0] != key:
            model._mkl_packed = None  # free the old copies first
            model._mkl_packed = key, {m: {r: torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), r)
                                          for r in rs} for m, rs in rows.items()}
        self.forwards = {m: functools.partial(packed_linear, m, packed)
                         for m, packed in model._mkl_packed[1].items()}

    def __enter__(self):
        for layer, forward in self.forwards.items():
            layer.__dict__['forward'] = forward  # shadows nn.Linear.forward (and faster than setattr)

    def __exit__(self, *exc):
        for layer in self.forwards:
            del layer.__dict__['forward']


def packed_linear(layer, packed, x):
    """layer(x), through the copy of layer's weight packed for as many rows as x has, if any."""
    rows = x.numel() // x.size(-1)
    if rows not in packed:
        return F.linear(x, layer.weight, layer.bias)
    return torch.ops.mkl._mkl_linear(x, packed[rows], layer.weight, layer.bias, rows)
