"""
The SLM language model: a GPT-2-shaped decoder-only transformer, as nanoGPT's model.py.

Parameter names follow GPT-2/nanoGPT (transformer.wte, transformer.h.N.attn.c_attn, ...)
so weights map 1:1 onto GPT-2 layouts. Pre-LayerNorm blocks, causal attention through
F.scaled_dot_product_attention, exact-GELU MLP, input/output embeddings tied. One forward
serves training, evaluation and generation, which lives in engine.py (kv cache, sampling,
the streaming loop); lean_kernels.py holds the memory-lean autograd kernels training runs.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import engine
# the custom kernels, chosen here and nowhere else: each computes what the PyTorch after it does, keeping less
from lean_kernels import Dropout  # nn.Dropout (a 1-byte mask on CPU)
from lean_kernels import GeluLinear  # c_proj(F.gelu(h)) while training (keeps h alone)
from lean_kernels import LinearCrossEntropy  # F.cross_entropy(lm_head(x), targets, ignore_index=-1) (chunked)
from optim import MuonAdamW  # --optimizer=muon: Muon for the hidden matrices, AdamW for the rest


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
        if torch.is_tensor(pos):  # one token per row, each at a position of its own (engine.Batch)
            return self.c_proj(self.attend_rows(q, k, v, kv_cache, pos).view(B, 1, C))
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

    def attend_rows(self, q, k, v, kv_cache, pos):
        """Rows at positions of their own: row b's key and value go in at pos[b] and its query
        attends over its pos[b] + 1 keys alone, as a batch of one: no row's numbers depend on another's."""
        (k_cache, v_cache), rows = kv_cache, torch.arange(q.size(0), device=q.device)
        k_cache[rows, :, pos], v_cache[rows, :, pos] = k[:, :, 0], v[:, :, 0]
        return torch.cat([F.scaled_dot_product_attention(q[b:b + 1], k_cache[b:b + 1, :, :p + 1],
                                                         v_cache[b:b + 1, :, :p + 1]).transpose(1, 2)
                          for b, p in enumerate(pos.tolist())])


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

    def forward(self, idx, targets=None, kv_cache=None, pos=0, all_positions=False):
        """idx (B, T): tokens at positions pos..pos+T-1. Training (targets given): (None, mean
        loss). Inference: (last position's logits (B, 1, vocab_size), None). kv_cache (generation,
        engine.new_kv_cache): per layer the keys and values of the tokens before pos; idx's go in at pos.
        pos may be a (B,) tensor for one-token steps: each row at its own position (engine.Batch)."""
        B, T = idx.size()
        if torch.is_tensor(pos):  # (B,): a one-token decoding step, each row at a position of its own
            positions = pos.view(B, 1)
        else:
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
        # sampling needs the last position alone; all_positions: serve.py's echo scores a whole prompt
        return self.lm_head(x if all_positions else x[:, [-1], :]), None

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon=None):
        """AdamW, weight decay only on matrices and embeddings (>= 2-D); fused on CUDA and CPU (one
        kernel per step, no parameter-sized temporaries: ~0.1 GB off a CPU step's peak). muon (lr,
        momentum, weight_decay): the blocks' 2-D weights move by Muon, q, k, v apart (optim.py)."""
        hidden = {id(p): name for name, p in self.transformer.h.named_parameters() if p.dim() == 2} if muon else {}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in hidden]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        if muon:
            groups += [{'params': [p], 'muon': True, 'split': 3 if hidden[id(p)].endswith('c_attn.weight') else 1,
                        'lr_ratio': muon['lr'] / learning_rate, 'weight_decay': muon['weight_decay']}
                       for p in self.transformer.h.parameters() if id(p) in hidden]
            return MuonAdamW(groups, lr=learning_rate, betas=betas, momentum=muon['momentum'])
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

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot_token=None,
                 use_kv_cache=True, fast_window=False):
        """idx (B, T) with up to max_new_tokens tokens appended to each row, as nanoGPT's generate:
        engine.generate. Call model.eval() first."""
        return engine.generate(self, idx, max_new_tokens, temperature, top_k, top_p, eot_token,
                               use_kv_cache, fast_window)
