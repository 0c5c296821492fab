"""
Generation for model.py's GPT, as nanochat's engine.py: the KV cache, the window the model sees,
sampling, the streaming loop, then MKL's packed GEMM for decoding on x86 CPUs (optional).

It runs any model with GPT's forward(idx, kv_cache=, pos=), config and GPT-2 module names, and
imports nothing of model.py: model.py imports it for GPT.generate and GPT.generate_stream.
"""
import collections
import contextlib
import functools
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    only block_size // 2 .. block_size tokens (docs/sampling.md: its loss cost)."""
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
    """Yield the next token of every row of idx (B, T), a (B,) tensor, step by step.
    use_kv_cache and fast_window: see window_steps. temperature 0 is greedy; see sample_logits
    for top_k and top_p. With eot_token, a row that has produced it yields eot_token from then
    on, and the stream ends once all have. The draws come from generator (a torch.Generator:
    serve.py's per request), else torch's global one. Call model.eval() first."""
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
    linears = decode_linears(model, B) if use_kv_cache else contextlib.nullcontext()
    for run, pos in window_steps(T, max_new_tokens, model.config.block_size, use_kv_cache, fast_window):
        with linears:
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
    """Append up to max_new_tokens tokens to each row of idx (B, T) and return (B, T + n), as
    nanoGPT's generate. With eot_token, a row stops at its first eot_token and is padded with
    it while the others go on; generation ends once every row has stopped."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, eot_token,
                               use_kv_cache, fast_window))
    return torch.cat([idx] + [t.unsqueeze(1) for t in new], dim=1)


class Sequence:
    """One story being written in a Batch: its tokens so far, its window schedule, its sampling."""

    def __init__(self, ids, max_new_tokens, sampling, block_size, generator):
        self.tokens, self.prompt_len, self.sampling, self.generator = list(ids), len(ids), sampling, generator
        self.steps = window_steps(len(ids), max_new_tokens, block_size)
        self.left, self.row = max_new_tokens, None


class Batch:
    """The stories being written at once (serve.py): each step runs one forward over every
    story's next token, so a batch of 8 costs about what 2-3 stories alone would, and stories
    join and leave at any step. Each holds a row of one KV cache; the rows of stories still
    going are kept at the top (a leaving story's row takes the last one), so a step runs rows
    0..n-1. A prompt (or a re-run of a full window, window_steps' exact way) runs alone, as a
    batch of one. Attention is per row (model.attend_rows), so a story's numbers depend on the
    other rows only through the matrix multiplies' row count: invariant=True runs every step at
    all `size` rows (idle rows padded), and then a seeded story comes out the same whatever else
    is being written, at the cost of a full-size step at any load (docs/serve.md)."""

    def __init__(self, model, size, invariant=False):
        self.model, self.size, self.invariant = model, size, invariant
        self.cache = new_kv_cache(model, size)
        self.running = []  # Sequences, running[i] in cache row i
        self.linears = decode_linears(model, 1)  # the one-story steps run as sample.py's do
        self.pad = torch.full((size,), 0, dtype=torch.long, device=model.lm_head.weight.device)

    def add(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
        """Start a story from prompt ids (at most block_size); its first token comes at the next step."""
        assert len(self.running) < self.size and 0 < len(ids) <= self.model.config.block_size
        seq = Sequence(ids, max_new_tokens, (temperature, top_k, top_p), self.model.config.block_size, generator)
        seq.row = len(self.running)
        self.running.append(seq)
        return seq

    def remove(self, seq):
        """Stop a story (ended, or its client went away): the last row moves into its row."""
        last = self.running.pop()
        if last is not seq:
            for k, v in self.cache:
                k[seq.row], v[seq.row] = k[last.row], v[last.row]
            last.row = seq.row
            self.running[seq.row] = last

    @torch.no_grad()
    def step(self):
        """Each running story's next token and the logits it was drawn from: [(seq, token, logits (V,))].
        A story that has had max_new_tokens leaves; the caller removes one that ends otherwise."""
        runs = [(seq, *next(seq.steps)) for seq in self.running]
        logits = {}
        with self.linears:
            decoding = [(seq, pos) for seq, run, pos in runs if run == 1]
            if decoding:  # first: its padding rows write position 0, which a prompt then overwrites
                n = self.size if self.invariant else len(self.running)
                idx, pos = self.pad[:n].clone(), self.pad[:n].clone()
                for seq, p in decoding:
                    idx[seq.row], pos[seq.row] = seq.tokens[-1], p
                out = self.model(idx.view(n, 1), kv_cache=[(k[:n], v[:n]) for k, v in self.cache], pos=pos)[0]
                logits.update((seq, out[seq.row, -1]) for seq, _ in decoding)
            for seq, run, pos in runs:
                if run > 1:
                    window = torch.tensor([seq.tokens[-run:]], device=self.pad.device)
                    cache = [(k[seq.row:seq.row + 1], v[seq.row:seq.row + 1]) for k, v in self.cache]
                    logits[seq] = self.model(window, kv_cache=cache, pos=0)[0][0, -1]
        # stories with the same options draw in one call, each from its own generator; the
        # nucleus (top_p) may sort a whole batch, whose order of equal values is not a row's alone
        groups = collections.defaultdict(list)
        for seq, _, _ in runs:
            top_p = seq.sampling[2]
            groups[seq.sampling if top_p is None or top_p >= 1 else seq].append(seq)
        for seqs in groups.values():
            rows = torch.stack([logits[seq] for seq in seqs])
            for seq, token in zip(seqs, sample_logits(rows, *seqs[0].sampling, [s.generator for s in seqs]).tolist()):
                seq.tokens.append(token)
                seq.left -= 1
        out = [(seq, seq.tokens[-1], logits[seq]) for seq, _, _ in runs]
        for seq in [seq for seq in self.running if seq.left == 0]:
            self.remove(seq)
        return out


@torch.no_grad()
def prompt_logprobs(model, ids):
    """(len(ids) - 1, V) log-probabilities: row i is the model's next-token distribution after
    ids[:i + 1], so row i at ids[i + 1] scores that token (serve.py's echo). ids scored as
    given, nothing put before them, in one forward: at most block_size + 1 of them."""
    idx = torch.tensor([ids[:-1]], device=model.lm_head.weight.device)
    return F.log_softmax(model(idx, all_positions=True)[0][0].float(), dim=-1)


def sampling_problem(temperature, top_k, top_p):
    """What is wrong with these sampling options, in one line, or None: the one rule that
    generate, sample.py, eval.py, serve.py and bench.py all apply. top_k 0 or None and top_p 1
    or None switch those filters off."""
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
    the nucleus: the fewest most-likely tokens whose probabilities add up to >= top_p.
    generator: as draw's."""
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
    from generator (None: torch's global one; a list: one per row, each drawing as alone).

    Inverse CDF: one uniform number per row. (torch.multinomial draws one exponential per
    entry: about 1 ms per token on a CPU over 50k tokens, a tenth of a generation step.)
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    if isinstance(generator, list):
        u = torch.cat([torch.rand((1, 1), generator=g, dtype=total.dtype, device=total.device) for g in generator])
    else:
        u = torch.rand(total.shape, generator=generator, dtype=total.dtype, device=total.device)
    u *= torch.nextafter(total, torch.zeros_like(total))  # in [0, total)
    # the first entry whose cdf exceeds u; zero-probability entries never are the first
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def decode_linears(model, batch_size):
    """A context within which model's Linear layers run as decoding batch_size rows per step
    wants them: through MKL's packed GEMM where the optional block below applies, else as they
    are. Making it prepares the weights (packs them once, until they change), so bench.py makes
    one before it starts a clock."""
    return PackedLinears(model, batch_size)  # without the block below: contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Optional: MKL's packed GEMM for decoding on x86 CPUs. Deleting this block (to the end of the
# file) and the imports of functools, weakref and torch.nn, with decode_linears returning
# contextlib.nullcontext(), costs speed alone: the same tokens, each decoding step's matmuls up
# to 1.5x slower on x86 CPUs with MKL (docs/sampling.md: KV cache). tests/test_model.py's tests marked
# MKL_PACKED_GEMM and the PackedLinears line of its compiled-decoding test go with it. Nothing
# outside this block knows of the packed copies: they live in _packed, not on the model, are
# remade when the weights change and freed when the model trains or is freed.

MKL_PACKED_GEMM = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, '_mkl_linear')
_packed = weakref.WeakKeyDictionary()  # model: {'key': which weights, 'copies': packed_copies' answer}


class PackedLinears:
    """Within `with PackedLinears(model, batch_size):` model's Linear layers multiply through
    MKL's packed GEMM, as torch.compile's frozen CPU graphs do. Decoding multiplies a few rows by
    each weight, and plain MKL GEMM then re-lays the weight out on every call; a copy laid out
    once reads up to 1.5x faster (docs/sampling.md: KV cache). Packed for batch_size rows (the one-token
    steps: every Linear and lm_head) and batch_size * block_size rows (the exact mode's window
    re-runs: the blocks' Linears); see packed_copies for how long the copies live.
    Off without MKL, off the CPU, unless float32, under CPU autocast, and after model.compile()."""

    def __init__(self, model, batch_size):
        self.copies, self.forwards = {}, {}  # layer: its packed weights; what runs instead of nn.Linear.forward
        weight = model.lm_head.weight
        if not (MKL_PACKED_GEMM and weight.device.type == 'cpu' and weight.dtype == torch.float32
                and not torch.is_autocast_enabled('cpu')
                and model._compiled_call_impl is None):  # model.compile(): compile cannot lower the op
            _packed.get(model, {}).clear()  # e.g. moved to a GPU: free the CPU copies
            return
        rows = {m: (batch_size, batch_size * model.config.block_size)
                for m in model.transformer.h.modules() if isinstance(m, nn.Linear)}
        rows[model.lm_head] = (batch_size,)
        self.copies = packed_copies(model, rows)
        self.forwards = {m: functools.partial(packed_linear, m, packed, m is model.lm_head)
                         for m, packed in self.copies.items()}

    def __enter__(self):
        for layer, forward in self.forwards.items():
            layer.__dict__['forward'] = forward  # shadows nn.Linear.forward (and faster than setattr)

    def __exit__(self, *exc):
        for layer in self.forwards:
            del layer.__dict__['forward']


def packed_copies(model, rows):
    """rows {layer: (n, ...)} -> {layer: {n: layer's weight packed for n rows}}. The copies
    (~180 MB at the seed config, ~0.1 s to make) are kept for the next decoding while the
    weights stay the same tensors at the same version (an optimizer step or load_state_dict
    bumps it), and freed at the model's next backward pass: its optimizer step will make them
    stale, and a training run that decodes between steps (train.py) need not hold them."""
    key = [(m.weight.data_ptr(), m.weight._version, r) for m, r in rows.items()]
    state = _packed.get(model)
    if state is None:  # the first packing of this model: free its copies whenever it trains
        state = _packed[model] = {}
        free = functools.partial(free_packed_copies, weakref.ref(model))
        for m in rows:
            if m.weight.requires_grad:
                m.weight.register_post_accumulate_grad_hook(free)
    if state.get('key') != key:
        state.clear()  # free the old copies first
        state['copies'] = {m: {r: torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), r) for r in rs}
                           for m, rs in rows.items()}
        state['key'] = key
    return state['copies']


def free_packed_copies(model_ref, weight):
    """A weight's gradient has come in: free the model's packed copies (packed_copies)."""
    model = model_ref()
    if model in _packed:  # False for None: the model is gone, and its copies with it
        _packed[model].clear()


def packed_linear(layer, packed, output_layer, x):
    """layer(x), through the copy of layer's weight packed for as many rows as x has, if any.
    The output layer's other row counts (a Batch's steps) run as weight @ x.T: MKL's GEMM picks
    a kernel for that layout that is 1.4x (16 rows) to 7x (2 rows) faster (docs/serve.md)."""
    rows = x.numel() // x.size(-1)
    if rows in packed:
        return torch.ops.mkl._mkl_linear(x, packed[rows], layer.weight, layer.bias, rows)
    if output_layer and layer.bias is None:
        return (layer.weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], -1)
    return F.linear(x, layer.weight, layer.bias)
