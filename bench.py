"""
Benchmark SLM on this machine, against limits measured on this machine in the same run.

    python bench.py --what=peak      # the limits: matmul FLOP/s in the training dtype, memory GB/s
    python bench.py --what=train     # the training step: tokens/s, ms/iter, MFU, peak memory
    python bench.py --what=sample    # generation tokens/s, time to first token, vs the weight-read limit
    python bench.py --what=prepare   # tokenizing MB/s vs one core's encode_ordinary rate x cores
    python bench.py --what=serve     # serve.py at 1, 4, 16 clients, batching and --batch_invariant (--baseline=OLD/serve.py)
    python bench.py --what=train --batch_size=16 --dtype=bfloat16 --compile=True --threads=2

nanoGPT's MFU divides by an A100's datasheet peak, which says nothing on a CPU or an H100.
Here every fraction is of a limit measured in the same run on the same machine: a large
GEMM for FLOP/s, a large copy and matrix-vector product for memory bandwidth, one core of
the tokenizer for prepare. The CPU is often shared: every figure is the best of several
repeats (noise only ever slows a run down), with the median beside it.
"""
import http.client
import json as jsonlib
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from dataclasses import fields

import torch

from common import (check_writable, config_defaults, die, die_if_disk_full, parse_config,
                    save_json)
from data import get_batch, get_tokenizer, read_stories
from device import autocast, cpu_count, matmul_flops, peak_memory, pick_device, pick_dtype, sync, timed
from engine import decode_linears, generate_stream, window_steps
from model import GPT, GPTConfig
from schedule import get_lr
# the two scripts whose own code bench.py times: train.py's step and prepare.py's pipeline
from prepare import prepare_files
from train import train_step

# -----------------------------------------------------------------------------
what = 'peak'           # what to measure; in {peak, train, sample, prepare, serve}
# the model: the seed config
n_layer = 6             # transformer blocks; in [1, inf)
n_head = 6              # attention heads per block; in [1, inf)
n_embd = 384            # width of the residual stream; in [1, inf)
block_size = 128        # context length in tokens; in [1, inf)
vocab_size = 50257      # GPT-2's BPE; in [1, inf)
dropout = 0.1           # as in training (on while timing the train step); in [0, 1)
bias = True             # biases in Linear and LayerNorm layers
# train
batch_size = 32         # sequences per micro-batch; in [1, inf)
gradient_accumulation_steps = 1  # micro-batches per timed step; in [1, inf)
optimizer = 'adamw'     # as train.py's --optimizer; in {adamw, muon}
warmup = 2              # untimed steps first (allocations, compile, caches); in [0, inf)
iters = 3               # timed steps per repeat (more on GPUs: --iters=50); in [1, inf)
repeats = 3             # runs of every timed figure (sample: fewer once one took 5 s); best and median reported; in [1, inf)
# sample
batches = '1,8'         # batch sizes to generate at
new_tokens = '100,200,500'  # new tokens per row; past block_size - prompt_tokens the window slides
prompt_tokens = 10      # tokens of the prompt before the new ones; in [1, inf)
temperature = 0.8       # as sample.py; in [0, inf)
top_k = 200             # as sample.py (0 or None = all tokens); in [0, inf)
nocache = True          # also time nanoGPT's no-cache loop (the reference; slow at batch 8)
# serve (random weights: no story ends early, each writes max_tokens)
clients = '1,4,16'      # clients streaming at once, each level in turn
max_tokens = 100        # tokens per story; in [1, inf)
concurrency = 16        # serve.py's --concurrency (stories written at once; the rest queue); in [1, inf)
baseline = ''           # another serve.py (e.g. an older checkout's) to time side by side, interleaved
# prepare
text = '../shared/data/tinystories/train.txt'  # a TinyStories-layout file, replicated to mb MB
mb = 100.0              # MB of text to tokenize; in (0, inf)
# peak
gemm_size = 0           # square GEMM side; 0 = 8192 on CUDA, 2048 elsewhere; in [0, inf)
copy_mb = 0             # bandwidth buffer; 0 = 1024 MB on CUDA, 256 MB elsewhere (> L3 caches); in [0, inf)
# machine
device = 'auto'         # auto = cuda, else mps, else cpu
dtype = 'auto'          # float32, bfloat16, float16; auto = bf16/fp16 on GPUs, fp32 elsewhere
compile = False         # torch.compile the model first
threads = 0             # torch threads (and prepare's processes); 0 = all cores; in [0, inf)
seed = 1337             # random weights and tokens; in [0, 2**63)
json = ''               # also write the figures to this JSON file
# -----------------------------------------------------------------------------


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(cfg, device, dtype):
    hw = torch.cuda.get_device_name(device) if device.startswith('cuda') else cpu_model()
    return (f"bench {cfg['what']} | device {device} ({hw}) | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | dtype {dtype} | compile {'on' if cfg['compile'] else 'off'}")


def print_table(rows):
    """rows: list of lists of str, the first the column names; right-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print('  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def fmt_rate(x, unit):
    for div, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if x >= div:
            return f"{x / div:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}"


# -----------------------------------------------------------------------------
# peak: what this machine can do at best

def measure_peak(device, dtype, gemm_size=0, copy_mb=0, repeats=5):
    """The machine's achievable matmul FLOP/s in dtype and memory bandwidth in bytes/s.

    FLOP/s: a warmed-up square GEMM (2 n^3 FLOPs). Bandwidth: a copy of a buffer larger
    than the caches (read + write bytes counted) and matrix x vector and vector x matrix
    products over it (the bytes of the matrix), the operations batch-1 decoding is made
    of; the bandwidth limit is the fastest of the three. Each figure is the best of repeats.
    Returns a dict; the buffers are freed when it returns.
    """
    cuda = device.startswith('cuda')
    n, gemm = matmul_flops(device, dtype, gemm_size, repeats)
    ptdtype = getattr(torch, dtype)
    nbytes = (copy_mb or (1024 if cuda else 256)) * 2**20
    cols = 512
    src = torch.ones(nbytes // (cols * ptdtype.itemsize), cols, device=device, dtype=ptdtype)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), device, 2, 2 * repeats)
    del dst
    x = torch.ones(cols, device=device, dtype=ptdtype)
    y = torch.empty(src.size(0), device=device, dtype=ptdtype)
    matvec = timed(lambda: torch.mv(src, x, out=y), device, 2, 2 * repeats)
    vecmat = timed(lambda: torch.mv(src.t(), y, out=x), device, 2, 2 * repeats)  # y @ src
    nbytes = src.numel() * ptdtype.itemsize
    del src, x, y
    result = {'gemm_size': n, 'buffer_bytes': nbytes,
              'matmul_flops': max(gemm), 'matmul_flops_median': statistics.median(gemm),
              'copy_bandwidth': 2 * nbytes / min(copy), 'copy_bandwidth_median': 2 * nbytes / statistics.median(copy),
              'matvec_bandwidth': nbytes / min(matvec), 'matvec_bandwidth_median': nbytes / statistics.median(matvec),
              'vecmat_bandwidth': nbytes / min(vecmat), 'vecmat_bandwidth_median': nbytes / statistics.median(vecmat)}
    result['bandwidth'] = max(result['copy_bandwidth'], result['matvec_bandwidth'], result['vecmat_bandwidth'])
    return result


def print_peak(peak, dtype):
    mb = peak['buffer_bytes'] / 2**20
    print_table([
        ['limit', 'best', 'median', 'how'],
        [f'matmul {dtype}', fmt_rate(peak['matmul_flops'], 'FLOP/s'), fmt_rate(peak['matmul_flops_median'], 'FLOP/s'),
         f"{peak['gemm_size']}x{peak['gemm_size']} GEMM, 2n^3 FLOPs"],
        ['copy bandwidth', fmt_rate(peak['copy_bandwidth'], 'B/s'), fmt_rate(peak['copy_bandwidth_median'], 'B/s'),
         f"{mb:.0f} MB copy, read + write bytes"],
        ['matvec bandwidth', fmt_rate(peak['matvec_bandwidth'], 'B/s'),
         fmt_rate(peak['matvec_bandwidth_median'], 'B/s'),
         f"{mb:.0f} MB matrix x vector, matrix bytes"],
        ['vecmat bandwidth', fmt_rate(peak['vecmat_bandwidth'], 'B/s'),
         fmt_rate(peak['vecmat_bandwidth_median'], 'B/s'),
         f"{mb:.0f} MB vector x matrix, matrix bytes"],
    ])
    print(f"memory bandwidth limit: {fmt_rate(peak['bandwidth'], 'B/s')} (the fastest of copy, matvec, vecmat)")


def bench_peak(cfg, device, dtype):
    peak = measure_peak(device, dtype, cfg['gemm_size'], cfg['copy_mb'], cfg['repeats'] + 2)
    print_peak(peak, dtype)
    return {'peak': peak}


# -----------------------------------------------------------------------------
# train: train.py's own step on random tokens

def bench_train(cfg, device, dtype):
    """Times train.py's loop body: get_lr, get_batch per micro-batch, train_step (forward,
    loss, backward per micro-batch, clip, AdamW step) and the loss.item() that syncs it."""
    # the seed recipe's optimizer (config/tinystories.py); the LR schedule as train.py steps it
    schedule = dict(learning_rate=5e-4, min_lr=5e-5, decay_lr=True, warmup_iters=1000, lr_decay_iters=0,
                    max_iters=20000, lr_schedule='cosine', decay_fraction=0.2)
    device_type = device.split(':')[0]
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    model = make_model(cfg, device)
    muon = dict(lr=0.02, momentum=0.95, weight_decay=0.0) if cfg['optimizer'] == 'muon' else None  # train.py's
    optimizer = model.configure_optimizers(0.1, schedule['learning_rate'], (0.9, 0.95), device_type, muon)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    train_model = torch.compile(model) if cfg['compile'] else model
    ctx = autocast(device, dtype)
    B, T, accum = cfg['batch_size'], cfg['block_size'], cfg['gradient_accumulation_steps']
    gen = torch.Generator().manual_seed(cfg['seed'])
    # random tokens standing in for train.bin (a uint16 array, as the memmap is)
    data = torch.randint(cfg['vocab_size'], (max(1 << 20, 2 * accum * B * (T + 1)),), generator=gen,
                         dtype=torch.int32).numpy().astype('uint16')

    def step(it):
        batches = [get_batch(data, B, T, gen, device) for _ in range(accum)]
        loss = train_step(train_model, optimizer, scaler, batches, get_lr(it, schedule), 0.5, ctx)
        return loss.item()

    for it in range(cfg['warmup']):
        step(it)
    per_iter = []  # mean seconds per step of each repeat
    for r in range(cfg['repeats']):
        sync(device)
        t0 = time.perf_counter()
        for it in range(cfg['iters']):
            loss = step(cfg['warmup'] + r * cfg['iters'] + it)
        per_iter.append((time.perf_counter() - t0) / cfg['iters'])
        print(f"  repeat {r + 1}: {1000 * per_iter[-1]:.1f} ms/iter", file=sys.stderr)
    peak_mem = peak_memory(device)  # read before measure_peak allocates its buffers
    mem_name = 'peak GPU memory (max_memory_allocated)' if device_type == 'cuda' else 'peak RSS (ru_maxrss)'
    del train_model, optimizer, scaler
    peak = measure_peak(device, dtype, cfg['gemm_size'], cfg['copy_mb'])

    tokens = accum * B * T
    fpt = model.flops_per_token()
    N = model.get_num_params(non_embedding=False) - model.transformer.wpe.weight.numel()
    best, median = min(per_iter), statistics.median(per_iter)
    mfu, mfu_median = (model.estimate_mfu(tokens, dt, peak['matmul_flops']) for dt in (best, median))
    train = {'tokens_per_iter': tokens, 'seconds_per_iter': per_iter, 'tokens_per_s': tokens / best,
             'tokens_per_s_median': tokens / median, 'flops_per_token': fpt,
             'mfu': mfu, 'mfu_median': mfu_median,
             'peak_memory_bytes': peak_mem, 'memory': mem_name, 'loss': loss}
    print_train(train, cfg, peak, dtype, N)
    return {'peak': peak, 'train': train}


def print_train(train, cfg, peak, dtype, N):
    """The train figures against the matmul limit; N: the model's parameters less the position table."""
    B, T, accum = cfg['batch_size'], cfg['block_size'], cfg['gradient_accumulation_steps']
    tokens, fpt, per_iter = train['tokens_per_iter'], train['flops_per_token'], train['seconds_per_iter']
    best, median = min(per_iter), statistics.median(per_iter)
    limit = peak['matmul_flops'] / fpt  # tokens/s at 100% MFU
    print(f"{tokens:,} tokens per step ({accum} x {B} x {T}), {cfg['optimizer']}, loss {train['loss']:.3f}, {cfg['warmup']} warm-up "
          f"steps, then {cfg['repeats']} repeats of {cfg['iters']} steps")
    print(f"model FLOPs per token = 6*N + 12*n_layer*n_embd*block_size = 6*{N:,} + 12*{cfg['n_layer']}*"
          f"{cfg['n_embd']}*{T} = {fpt / 1e6:.1f} MFLOP (N = parameters less the position table)")
    print_table([
        ['figure', 'best', 'median', 'limit', 'of limit'],
        ['tokens/s', f"{tokens / best:,.0f}", f"{tokens / median:,.0f}", f"{limit:,.0f}",
         f"{tokens / best / limit:.0%}"],
        ['ms/iter', f"{1000 * best:.1f}", f"{1000 * median:.1f}", f"{1000 * tokens / limit:.1f}", ''],
        ['MFU', f"{train['mfu']:.1%}", f"{train['mfu_median']:.1%}", '100%', ''],
        [train['memory'], f"{train['peak_memory_bytes'] / 1e9:.2f} GB", '', '', ''],
    ])
    print(f"limit = measured {dtype} matmul peak {fmt_rate(peak['matmul_flops'], 'FLOP/s')} "
          f"({peak['gemm_size']}x{peak['gemm_size']} GEMM) / FLOPs per token")


# -----------------------------------------------------------------------------
# sample: generation speed against the weight-read and FLOP limits

def make_model(cfg, device):
    torch.manual_seed(cfg['seed'])
    config = GPTConfig(**{f.name: cfg[f.name] for f in fields(GPTConfig)})  # bench's model keys are GPTConfig's
    return GPT(config, verbose=False).to(device)


def generation_limit(model, batch, steps, peak):
    """Fewest seconds the steps can take: each step reads every weight once (bandwidth) and
    does 2 FLOPs per weight per token run through the blocks, plus the lm_head for the one
    position sampled (matmul FLOP/s); it cannot beat the slower of the two."""
    weight_bytes = weight_bytes_per_step(model)
    body = sum(p.numel() for p in model.transformer.h.parameters())
    head = model.lm_head.weight.numel()
    return sum(max(weight_bytes / peak['bandwidth'], batch * (2 * body * t + 2 * head) / peak['matmul_flops'])
               for t in steps)


def weight_bytes_per_step(model):
    """Bytes of weights a decoding step reads: all of them, less the position table (one row)."""
    wpe = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - wpe.numel() * wpe.element_size()


def time_generation(model, prompt, n, mode, cfg, device, dtype):
    """(seconds to the first token, seconds for all n) of one generate_stream run."""
    with autocast(device, dtype):  # MKL packing depends on autocast, as generate_stream runs it
        if mode != 'no cache':
            decode_linears(model, prompt.size(0))  # MKL packing: once per batch size in sample.py, not timed
        sync(device)
        t0 = time.perf_counter()
        first = None
        for i, _ in enumerate(generate_stream(model, prompt, n, cfg['temperature'], cfg['top_k'],
                                              use_kv_cache=mode != 'no cache', fast_window=mode == 'fast')):
            if i == 0:
                sync(device)
                first = time.perf_counter() - t0
    sync(device)
    return first, time.perf_counter() - t0


def decode_matmul_seconds(model, batch, device, dtype):
    """Seconds of one decoding step's matmuls alone (every Linear of the blocks and lm_head,
    as a decoding step runs them at this batch size): the step if nothing else took time."""
    layers = [m for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    inputs = [torch.randn(batch, 1, m.in_features, device=device) for m in layers]
    with torch.no_grad(), autocast(device, dtype), decode_linears(model, batch):
        return min(timed(lambda: [m(x) for m, x in zip(layers, inputs)], device, 3, 20))


def int_list(cfg, key):
    try:
        values = [int(v) for v in str(cfg[key]).split(',') if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        die(f"--{key}={cfg[key]!r} must be comma-separated whole numbers >= 1, e.g. --{key}=1,8")
    return values


def bench_sample(cfg, device, dtype):
    batches, lengths = int_list(cfg, 'batches'), int_list(cfg, 'new_tokens')
    T0 = cfg['prompt_tokens']
    peak_before = measure_peak(device, dtype, cfg['gemm_size'], cfg['copy_mb'])
    model = make_model(cfg, device)
    model.eval()
    if cfg['compile']:
        model.compile(dynamic=True)  # as sample.py --compile
    modes = ['kv', 'fast'] + (['no cache'] if cfg['nocache'] else [])
    gen = torch.Generator().manual_seed(cfg['seed'])
    prompts = {B: torch.randint(cfg['vocab_size'], (B, T0), generator=gen).to(device) for B in batches}
    # inside the window fast and exact are the same code
    cases = [(B, n, mode) for B in batches for n in lengths for mode in modes
             if not (mode == 'fast' and T0 + n <= cfg['block_size'])]
    for B in batches:  # warm up every code path at each batch size (allocations; with compile, every shape)
        warm = min(max(lengths), cfg['block_size'] - T0 + 2 if cfg['compile'] else 8)
        for mode in modes:
            time_generation(model, prompts[B], warm, mode, cfg, device, dtype)
    # rounds over all the rows, so that the machine speeding up or slowing down (a VM's
    # neighbours) hits every row alike: the targets are ratios of rows. Rows whose runs
    # took 5 s in all stop early (long runs: fewer repeats)
    times = {case: [] for case in cases}
    for _ in range(cfg['repeats']):
        for B, n, mode in cases:
            if sum(t[1] for t in times[B, n, mode]) < 5:
                times[B, n, mode].append(time_generation(model, prompts[B], n, mode, cfg, device, dtype))
                print(f"  batch {B}, {n} new tokens, {mode}: {B * n / times[B, n, mode][-1][1]:.1f} tokens/s",
                      file=sys.stderr)
    results = []
    for (B, n, mode), ts in times.items():
        first, total = min(ts, key=lambda t: t[1])
        results.append({'batch': B, 'new_tokens': n, 'mode': mode, 'tokens_per_s': B * n / total,
                        'tokens_per_s_median': B * n / statistics.median(t[1] for t in ts),
                        'first_token_ms': 1000 * first, 'runs': len(ts)})
    matmuls = {B: decode_matmul_seconds(model, B, device, dtype) for B in batches}
    # the limits: peak measured before and after the rows, the better of the two (less noise)
    peak_after = measure_peak(device, dtype, cfg['gemm_size'], cfg['copy_mb'])
    peak = {k: max(v, peak_after[k]) for k, v in peak_before.items()}
    for r in results:
        steps = [run for run, _ in window_steps(T0, r['new_tokens'], cfg['block_size'],
                                                 r['mode'] != 'no cache', r['mode'] == 'fast')]
        r['limit_tokens_per_s'] = r['batch'] * r['new_tokens'] / generation_limit(model, r['batch'], steps, peak)
    wb = weight_bytes_per_step(model)
    ratios = print_sample(results, cfg, peak, wb, matmuls)
    return {'peak': peak, 'sample': results, 'ratios': ratios, 'weight_bytes_per_step': wb,
            'matmul_seconds_per_step': matmuls}


def print_sample(results, cfg, peak, wb, matmuls):
    """The table of sample rows, then the ratios the targets are stated in (from this one run)."""
    T0, batches, lengths = cfg['prompt_tokens'], int_list(cfg, 'batches'), int_list(cfg, 'new_tokens')
    exact = 'kv (exact)'
    rows = [['batch', 'new', 'mode', 'tokens/s', 'median', 'runs', 'ms/step', 'first token', 'limit', 'of limit']]
    for r in results:
        rows.append([str(r['batch']), str(r['new_tokens']), exact if r['mode'] == 'kv' else r['mode'],
                     f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s_median']:.1f}", str(r['runs']),
                     f"{1000 * r['batch'] / r['tokens_per_s']:.2f}", f"{r['first_token_ms']:.1f} ms",
                     f"{r['limit_tokens_per_s']:.1f}", f"{r['tokens_per_s'] / r['limit_tokens_per_s']:.0%}"])
    print(f"prompt {T0} random tokens, temperature {cfg['temperature']}, top_k {cfg['top_k']}; "
          f"tokens/s = batch x new tokens / seconds of the whole call (first token included)")
    print_table(rows)
    print(f"limit = per step the slower of reading the weights ({wb / 1e6:.1f} MB at "
          f"{fmt_rate(peak['bandwidth'], 'B/s')}: {peak['bandwidth'] / wb:.1f} steps/s) and their matmul FLOPs "
          f"at {fmt_rate(peak['matmul_flops'], 'FLOP/s')}")
    for B, seconds in matmuls.items():
        print(f"batch {B}: a step's matmuls alone take {1000 * seconds:.2f} ms "
              f"({wb / peak['bandwidth'] / seconds:.0%} of the weight-read limit)")
    row = {(r['batch'], r['new_tokens'], r['mode']): r for r in results}
    ratios = {}
    tps = lambda *key: row[key]['tokens_per_s']
    n_in = max([n for n in lengths if T0 + n <= cfg['block_size']], default=None)  # inside the window
    if (1, n_in, 'kv') in row:
        r = row[(1, n_in, 'kv')]
        ratios['batch1_of_weight_read_limit'] = f = r['tokens_per_s'] / r['limit_tokens_per_s']
        print(f"batch 1, {n_in} new tokens (inside the window): {f:.0%} of the weight-read limit (target >= 80%)")
    for n in lengths:
        if (1, n, 'no cache') in row:
            ratios[f'kv_vs_nocache_{n}'] = f = tps(1, n, 'kv') / tps(1, n, 'no cache')
            print(f"batch 1, {n} new tokens: kv cache (exact) {f:.2f}x no cache"
                  + (" (target >= 1.8x)" if n == 200 else ""))
    for B in batches:
        if B > 1 and (B, n_in, 'kv') in row and (1, n_in, 'kv') in row:
            ratios[f'batch{B}_vs_batch1_{n_in}'] = f = tps(B, n_in, 'kv') / tps(1, n_in, 'kv')
            print(f"batch {B}, {n_in} new tokens: {f:.2f}x the tokens/s of batch 1"
                  + (" (target >= 5x)" if B == 8 else ""))
    return ratios


# -----------------------------------------------------------------------------
# prepare: tokenizing speed against one core's tokenizer rate x cores

def bench_prepare(cfg, device, dtype):
    src, workers = cfg['text'], cfg['threads'] or cpu_count()
    stories = read_stories(src)  # dies clearly on a missing, empty or non-UTF-8 file
    with open(src, 'rb') as f:
        data = f.read()
    if not data.rstrip().endswith(b'<|endoftext|>'):
        data = data.rstrip() + b'\n<|endoftext|>\n'  # copies must not merge a last story with the next first
    copies = -(-int(cfg['mb'] * 1e6) // len(data))

    enc = get_tokenizer()
    enc.encode_ordinary(stories[0])  # loads the BPE ranks
    text_bytes = sum(len(s.encode('utf-8')) for s in stories)
    one_core, runs = [], []
    with tempfile.TemporaryDirectory(prefix='slm_bench_') as tmp:
        train_path = os.path.join(tmp, 'train.txt')
        try:
            with open(train_path, 'wb') as f:
                for _ in range(copies):
                    f.write(data)
        except OSError as e:  # the temp folder's disk is full: one line (TMPDIR picks another)
            die_if_disk_full(e, train_path)
            raise
        for _ in range(cfg['repeats']):  # limit and figure in turns, so both see the same machine
            # the limit: encode_ordinary on one core, story by story as the workers call it, for
            # >= 1 s (a short burst would catch only the quiet moments of a busy machine)
            t0, passes = time.perf_counter(), 0
            while passes == 0 or time.perf_counter() - t0 < 1.0:
                for s in stories:
                    enc.encode_ordinary(s)
                passes += 1
            one_core.append(passes * text_bytes / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            with open(os.devnull, 'w') as quiet, redirect_stdout(quiet):  # prepare's progress lines
                meta = prepare_files([train_path], [src], os.path.join(tmp, 'out'), force=True,
                                             num_proc=workers)
            runs.append(time.perf_counter() - t0)
    nbytes = sum(s['text_bytes'] for s in meta['splits'].values())
    tokens = sum(s['tokens'] for s in meta['splits'].values())
    limit = max(one_core) * workers
    best = nbytes / min(runs)
    print(f"prepare.prepare_files on {src} x {copies} ({nbytes / 1e6:.1f} MB of stories, {tokens:,} tokens) "
          f"with {workers} processes; MB = 1e6 bytes of stripped story text")
    print_table([
        ['figure', 'best', 'median', 'limit', 'of limit'],
        ['prepare MB/s', f"{best / 1e6:.2f}", f"{nbytes / statistics.median(runs) / 1e6:.2f}",
         f"{limit / 1e6:.2f}", f"{best / limit:.0%}"],
        ['prepare tokens/s', f"{tokens / min(runs) / 1e6:.2f}M", f"{tokens / statistics.median(runs) / 1e6:.2f}M",
         '', ''],
        ['encode_ordinary 1 core MB/s', f"{max(one_core) / 1e6:.2f}", f"{statistics.median(one_core) / 1e6:.2f}",
         '', ''],
    ])
    print(f"limit = one core's encode_ordinary rate x {workers} cores = {limit / 1e6:.2f} MB/s")
    return {'prepare': {'text_bytes': nbytes, 'tokens': tokens, 'seconds': runs, 'workers': workers,
                        'mb_per_s': best / 1e6, 'tokens_per_s': tokens / min(runs),
                        'one_core_mb_per_s': max(one_core) / 1e6, 'limit_mb_per_s': limit / 1e6,
                        'fraction_of_limit': best / limit}}


# -----------------------------------------------------------------------------
# serve: serve.py under load, as clients see it

def stream_story(url, cfg, seed):
    """One streaming completion: (seconds to its first text, seconds to its end, chunks, HTTP status)."""
    host, port = url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {'prompt': 'Once upon a time', 'max_tokens': cfg['max_tokens'], 'temperature': cfg['temperature'],
            'top_k': cfg['top_k'], 'seed': seed, 'stream': True}
    t0 = time.perf_counter()
    conn.request('POST', '/v1/completions', jsonlib.dumps(body), {'Content-Type': 'application/json'})
    r = conn.getresponse()
    first, chunks = None, 0
    for line in r:
        if line.startswith(b'data: {'):
            chunks += 1
            first = first or time.perf_counter() - t0
    conn.close()
    return first, time.perf_counter() - t0, chunks, r.status


def start_server(name, script, args, cfg, ckpt, device, dtype, levels):
    """script (a serve.py) on a free port with the bench model: (process, its URL)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    with open(f'{ckpt}.{name}.err', 'w') as errors:  # a file, not a pipe: a full pipe would stall the server
        server = subprocess.Popen([sys.executable, script, f'--ckpt={ckpt}', '--port=0', f'--device={device}',
                                   f'--dtype={dtype}', f"--concurrency={cfg['concurrency']}", f"--queue={max(levels)}",
                                   f"--max_tokens_limit={cfg['max_tokens']}", *args],
                                  stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
                                  cwd=os.path.dirname(os.path.abspath(script)))
    url = next((m.group(1) for line in server.stdout if (m := re.search(r'on (http://[\d.]+:\d+)/', line))), None)
    if url is None:
        said = open(errors.name).read().strip().splitlines()
        die(f"{script} did not start: {said[-1] if said else f'exit code {server.wait()}'}")
    stream_story(url, cfg, 0)  # warm-up: first-call allocations, packed weights
    return server, url


def serve_level(url, cfg, n):
    """n clients each stream stories back to back (16 in all, at least 2 per client): one row."""
    per_client, results = max(2, -(-16 // n)), []

    def client(i):
        for k in range(per_client):
            results.append(stream_story(url, cfg, seed=1000 * i + k))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[3] == 200]
    ttft = sorted(r[0] for r in ok)
    return {'clients': n, 'streams': len(ok), 'rejected': len(results) - len(ok), 'seconds': wall,
            'streams_per_s': len(ok) / wall, 'tokens_per_s': len(ok) * cfg['max_tokens'] / wall,
            'ttft_median': statistics.median(ttft), 'ttft_p90': ttft[int(0.9 * (len(ttft) - 1))],
            'stream_seconds_median': statistics.median(r[1] for r in ok)}


def bench_serve(cfg, device, dtype):
    """serve.py (subprocesses, as users run it) with the bench model's random weights, batching and
    --batch_invariant (and --baseline's serve.py) side by side: each level runs on each in turn,
    --repeats times over; the run with the median tokens/s is shown, with the range."""
    levels, rows, servers = int_list(cfg, 'clients'), [], []
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.py')
    kinds = [('batching', here, []), ('batch-invariant', here, ['--batch_invariant=True'])]
    kinds += [('baseline', os.path.abspath(cfg['baseline']), [])] if cfg['baseline'] else []
    with tempfile.TemporaryDirectory(prefix='slm_bench_') as tmp:
        model = make_model(cfg, 'cpu')
        ckpt = os.path.join(tmp, 'model.pt')
        torch.save({'model': model.state_dict(), 'model_args': vars(model.config)}, ckpt)
        try:
            for name, script, args in kinds:
                servers.append((name, *start_server(name, script, args, cfg, ckpt, device, dtype, levels)))
            for n in levels:
                runs = {name: [] for name, _, _ in servers}
                for _ in range(cfg['repeats']):
                    for name, _, url in servers:
                        runs[name].append(serve_level(url, cfg, n))
                for name, level in runs.items():
                    level.sort(key=lambda run: run['tokens_per_s'])
                    rows.append({'server': name, **level[(len(level) - 1) // 2],
                                 'tokens_per_s_runs': [run['tokens_per_s'] for run in level]})
        finally:
            for _, server, _ in servers:
                server.terminate()
                server.wait(30)
    print(f"serve.py --concurrency={cfg['concurrency']}, stories of {cfg['max_tokens']} tokens "
          f"(random weights: none ends early), streamed; time to first token includes any wait in the queue")
    print_table([['server', 'clients', 'streams', 'rejected', 'streams/s', 'tokens/s', 'range', 'first token median',
                  'p90', 'story median']] +
                [[r['server'], str(r['clients']), str(r['streams']), str(r['rejected']), f"{r['streams_per_s']:.2f}",
                  f"{r['tokens_per_s']:.0f}", f"{min(r['tokens_per_s_runs']):.0f}-{max(r['tokens_per_s_runs']):.0f}",
                  f"{r['ttft_median'] * 1000:.0f} ms", f"{r['ttft_p90'] * 1000:.0f} ms",
                  f"{r['stream_seconds_median']:.2f} s"] for r in rows])
    return {'serve': rows}


# -----------------------------------------------------------------------------

MODES = {'peak': bench_peak, 'train': bench_train, 'sample': bench_sample, 'prepare': bench_prepare,
         'serve': bench_serve}


def check_config(cfg):
    """Bad flag values stop here, with one line, before anything is measured."""
    if cfg['n_embd'] % cfg['n_head']:
        die(f"--n_embd={cfg['n_embd']} must be divisible by --n_head={cfg['n_head']}")
    if cfg['what'] == 'train' and cfg['vocab_size'] > 2**16:  # the stand-in train.bin is uint16, as prepare's
        die(f"--vocab_size={cfg['vocab_size']} does not fit the uint16 tokens train.py reads: use at most 65536")
    int_list(cfg, 'batches')  # dies on a bad list
    int_list(cfg, 'new_tokens')
    int_list(cfg, 'clients')
    if cfg['what'] == 'sample' and cfg['prompt_tokens'] > cfg['block_size']:
        die(f"--prompt_tokens={cfg['prompt_tokens']} must be between 1 and block_size ({cfg['block_size']})")
    if cfg['what'] == 'prepare' and not os.path.isfile(cfg['text']):
        die(f"--text={cfg['text']} {'is a folder' if os.path.isdir(cfg['text']) else 'not found'}: pass a text "
            f"file in the TinyStories layout (stories each followed by a line <|endoftext|>), "
            f"e.g. ../shared/data/tinystories/train.txt")
    if cfg['json']:  # written at the end: find out now, not after minutes of measuring
        check_writable(cfg['json'], '--json', folder=False)


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, nullable=('top_k',), script=__file__)
    check_config(cfg)
    dev = pick_device(cfg['device'])
    precision = pick_dtype(cfg['dtype'], dev)
    torch.set_num_threads(cfg['threads'] or cpu_count())
    print(header(cfg, dev, precision), flush=True)
    results = MODES[cfg['what']](cfg, dev, precision)
    if cfg['json']:
        os.makedirs(os.path.dirname(os.path.abspath(cfg['json'])), exist_ok=True)
        save_json({'header': header(cfg, dev, precision), 'config': cfg, **results}, cfg['json'])


if __name__ == '__main__':
    main()
