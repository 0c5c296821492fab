"""bench.py: every mode runs on a tiny config, prints its header and figures; the limits
it compares against follow the code they bound."""
import json

import pytest
import torch

from conftest import one_line_error, run_script
from engine import window_steps
from model import GPT, GPTConfig

TINY_MODEL = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--threads=1']
TINY_PEAK = ['--gemm_size=128', '--copy_mb=4', '--repeats=1']


def run_bench(tmp_path, *args):
    """bench.py in a subprocess; returns (completed process, its --json figures)."""
    out = tmp_path / 'bench.json'
    # TMPDIR: prepare's temp copy goes here, where the test checks it is removed
    r = run_script('bench.py', *args, f'--json={out}', env={'TMPDIR': tmp_path})
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text())


def check_header(stdout, what, dtype='float32'):
    first = stdout.splitlines()[0]
    assert first.startswith(f'bench {what} | device cpu (')
    assert f'torch {torch.__version__}' in first and 'threads 1' in first
    assert f'dtype {dtype}' in first and 'compile off' in first


def test_peak_measures_flops_and_bandwidth(tmp_path):
    r, res = run_bench(tmp_path, '--what=peak', '--threads=1', *TINY_PEAK)
    check_header(r.stdout, 'peak')
    assert 'FLOP/s' in r.stdout and 'memory bandwidth limit' in r.stdout
    peak = res['peak']
    assert peak['gemm_size'] == 128 and peak['buffer_bytes'] == 4 * 2**20
    assert 1e6 < peak['matmul_flops'] < 1e15 and peak['matmul_flops'] >= peak['matmul_flops_median']
    assert peak['bandwidth'] == max(peak['copy_bandwidth'], peak['matvec_bandwidth'], peak['vecmat_bandwidth']) > 1e6


def test_sample_times_every_mode_against_its_limit(tmp_path):
    r, res = run_bench(tmp_path, '--what=sample', *TINY_MODEL, *TINY_PEAK, '--batches=1,2',
                       '--new_tokens=6,20', '--prompt_tokens=4')
    check_header(r.stdout, 'sample')
    seen = {(row['batch'], row['new_tokens'], row['mode']) for row in res['sample']}
    # fast differs from exact only past the window (4 + 20 > 16), so it is timed only there
    assert seen == ({(b, n, m) for b in (1, 2) for n in (6, 20) for m in ('kv', 'no cache')}
                    | {(1, 20, 'fast'), (2, 20, 'fast')})
    for row in res['sample']:
        assert row['tokens_per_s'] > 0 and row['first_token_ms'] > 0 and row['limit_tokens_per_s'] > 0
    assert set(res['ratios']) == {'batch1_of_weight_read_limit', 'kv_vs_nocache_6', 'kv_vs_nocache_20',
                                  'batch2_vs_batch1_6'}
    assert 'of the weight-read limit' in r.stdout and 'kv (exact)' in r.stdout
    assert set(res['matmul_seconds_per_step']) == {'1', '2'}  # the matmuls alone, per batch size
    assert all(s > 0 for s in res['matmul_seconds_per_step'].values()) and "matmuls alone" in r.stdout
    n_weights = sum(p.numel() for p in GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16),
                                          verbose=False).parameters())
    assert res['weight_bytes_per_step'] == 4 * (n_weights - 16 * 32)  # fp32, all but the position table


def test_prepare_times_the_real_path_and_cleans_up(tmp_path, stories_dir):
    src = stories_dir / 'sample5.txt'
    r, res = run_bench(tmp_path, '--what=prepare', f'--text={src}', '--mb=0.02', '--repeats=1', '--threads=1')
    check_header(r.stdout, 'prepare')
    assert 'prepare MB/s' in r.stdout and 'encode_ordinary 1 core' in r.stdout
    from data import encode_stories, read_stories  # what prepare.py runs
    stories = read_stories(src)
    copies = -(-20_000 // src.stat().st_size)  # the file replicated to >= 0.02 MB, plus itself as val
    p = res['prepare']
    assert p['tokens'] == (copies + 1) * len(encode_stories(stories))
    assert p['text_bytes'] == (copies + 1) * sum(len(s.encode()) for s in stories)
    assert p['workers'] == 1 and p['limit_mb_per_s'] == pytest.approx(p['one_core_mb_per_s'])
    assert 0 < p['fraction_of_limit'] < 10
    assert [f.name for f in tmp_path.iterdir()] == ['bench.json']  # the replicated text is gone


def test_train_times_the_real_step_and_counts_flops_by_hand(tmp_path):
    r, res = run_bench(tmp_path, '--what=train', *TINY_MODEL, '--vocab_size=512', '--batch_size=2',
                       '--gradient_accumulation_steps=2', '--warmup=1', '--iters=2', '--repeats=2',
                       '--gemm_size=256', '--copy_mb=4')
    check_header(r.stdout, 'train')
    t = res['train']
    # hand count for n_layer=1, n_embd=C=32, vocab V=512, block_size 16: per block q,k,v + proj
    # (4C^2 + 4C), MLP (8C^2 + 5C), two LayerNorms (4C); the final LayerNorm (2C); the tied
    # embedding once, as the output layer (V*C). Training = 6 FLOPs per weight per token,
    # plus attention: 12 * n_layer * C * block_size.
    C, V = 32, 512
    n = (4 * C * C + 4 * C) + (8 * C * C + 5 * C) + 4 * C + 2 * C + V * C
    assert t['flops_per_token'] == 6 * n + 12 * 1 * C * 16
    assert f"6*{n:,} + 12*1*32*16" in r.stdout
    assert t['tokens_per_iter'] == 2 * 2 * 16 and len(t['seconds_per_iter']) == 2
    assert 0 < t['mfu'] < 1 and t['mfu'] >= t['mfu_median']
    assert t['tokens_per_s'] == pytest.approx(64 / min(t['seconds_per_iter']))
    assert 100e6 < t['peak_memory_bytes'] < 4e9 and 'peak RSS' in r.stdout
    assert 5 < t['loss'] < 8  # cross-entropy of random tokens over 512 ids: about ln(512) = 6.2


def test_bad_options_fail_in_one_line(tmp_path):
    for args, words in ((['--what=fly'], 'peak, train, sample, prepare'),
                        (['--what=sample', '--batches=0'], '--batches'),
                        (['--what=prepare', '--text=/nonexistent.txt'], 'not found')):
        assert words in one_line_error(run_script('bench.py', *args))


@pytest.mark.parametrize('prompt_len, n, expected', [
    (3, 10, dict(kv=[3] + [1] * 9, fast=[3] + [1] * 9, nocache=list(range(3, 13)))),
    # past block_size 16: exact re-runs the whole window each step, fast refills from 8 tokens
    (5, 30, dict(kv=[5] + [1] * 11 + [16] * 18, fast=[5] + [1] * 11 + ([8] + [1] * 8) * 2,
                 nocache=list(range(5, 16)) + [16] * 19)),
    (16, 7, dict(kv=[16] * 7, fast=[16, 8] + [1] * 5, nocache=[16] * 7)),
])
def test_generation_limit_follows_generate_schedule(prompt_len, n, expected):
    """window_steps (what the limit counts) is the number of tokens generate_stream really
    runs through the model at each step, for the exact, fast and no-cache paths."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16), verbose=False).eval()
    for mode in ('kv', 'fast', 'nocache'):
        calls = []
        full = model.forward
        model.forward = lambda idx, *args, **kwargs: calls.append(idx.size(1)) or full(idx, *args, **kwargs)
        try:
            model.generate(torch.zeros(1, prompt_len, dtype=torch.long), n, use_kv_cache=mode != 'nocache',
                           fast_window=mode == 'fast')
        finally:
            del model.forward
        assert calls == expected[mode], mode
        assert [run for run, _ in window_steps(prompt_len, n, 16, mode != 'nocache', mode == 'fast')] == calls


def test_serve_streams_stories_at_each_client_count(tmp_path):
    """serve.py as subprocesses under 1 and 3 clients, batching, --batch_invariant and a --baseline
    serve.py side by side, level by level, twice over: every stream completes, none rejected."""
    r, res = run_bench(tmp_path, '--what=serve', *TINY_MODEL, '--clients=1,3', '--max_tokens=8', '--concurrency=4',
                       '--baseline=serve.py', '--repeats=2')
    check_header(r.stdout, 'serve')
    assert [(row['server'], row['clients']) for row in res['serve']] == [
        (server, n) for n in (1, 3) for server in ('batching', 'batch-invariant', 'baseline')]
    for row in res['serve']:
        assert row['streams'] == max(2, -(-16 // row['clients'])) * row['clients'] and row['rejected'] == 0
        assert 0 < row['ttft_median'] <= row['ttft_p90'] and row['tokens_per_s'] == pytest.approx(8 * row['streams_per_s'])
        assert row['tokens_per_s'] == min(row['tokens_per_s_runs']) and len(row['tokens_per_s_runs']) == 2
    assert 'streams/s' in r.stdout and 'first token median' in r.stdout
