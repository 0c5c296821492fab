"""train.py: the LR schedule, gradient accumulation, the memory-lean training path, and end
to end on the ../shared TinyStories sample with config/tiny.py: prepare -> train -> best and
resumable checkpoints -> exact resume (weights and optimizer state bit for bit) -> sample;
config and data errors, short runs, SIGTERM, NaN stop, a 2-process DDP run over gloo through
torchrun, and the GPU users' paths run for real on the CPU: fp16 autocast with a GradScaler,
bf16 autocast, --compile=True (alone, resumed, and under DDP)."""
import copy
import json
import math
import os
import re
import shutil
import signal
import time

import pytest
import torch

import runlog
import train
from conftest import (REPO, assert_same_state, error_of, one_line_error, prepare_stories, read_log, run_script,
                      run_until_sigterm)
from model import GPT, GPTConfig

TINY = 'config/tiny.py'
# config/tiny.py sets no schedule key, so the cosine ends at max_iters: a run cut short with
# --max_iters=4 that is compared with run_a (or resumed to its 8 steps) keeps run_a's 8-step
# schedule with this (its warmup is cut to 8 // 10 = 0 steps either way)
RUN_A_SCHEDULE = '--lr_decay_iters=8'


def run_train(*args, launcher=(), timeout=300, report=False):
    """train.py as a user runs it. The report card at the end (eval.py's full pass and ten
    stories: ~30 s here, 3x the training) is on only where asked: run_a covers it."""
    return run_script(*launcher, 'train.py', TINY, *args, *([] if report else ['--report=False']), timeout=timeout)


def step_losses(stdout):
    """{iter: loss} from the progress lines ('iter 5/8 | loss 10.7396 | ...')."""
    return {int(i): float(l) for i, l in re.findall(r'^iter (\d+)/\d+ \| loss ([\d.]+)', stdout, re.M)}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, stories_dir):
    return prepare_stories(tmp_path_factory.mktemp('data') / 'tinystories', stories_dir / 'train.txt',
                           stories_dir / 'validation.txt')


@pytest.fixture(scope='module')
def run_a(data_dir, tmp_path_factory):
    """The reference run: config/tiny.py, 8 steps, evaluations at 0, 4 and 8. It starts up as a
    default run does (tiny.py shrinks sizes only; e.g. the peak matmul is measured), with
    dropout on and 2 micro-batches per step."""
    out = tmp_path_factory.mktemp('run_a')
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={out}', report=True)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


# -----------------------------------------------------------------------------
# pieces, in-process

def rss_file_kb():
    """Pages of mapped files counted in this process's RSS (Linux)."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('RssFile:'))


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reads /proc (Linux)')
def test_reading_batches_does_not_grow_memory(tmp_path):
    """A long run reads windows all over train.bin; RSS must not grow toward the file's size."""
    import numpy as np
    path = tmp_path / 'train.bin'
    np.arange(32 * 2**20, dtype=np.uint32).astype(np.uint16).tofile(path)  # 64 MB
    data = np.memmap(path, dtype=np.uint16, mode='r')
    gen = torch.Generator().manual_seed(0)
    before = rss_file_kb()
    for _ in range(4000):  # 128k random windows: nearly every 4 KB page of the file
        x, y = train.get_batch(data, 32, 128, gen, 'cpu')
    assert torch.equal(x[:, 1:], y[:, :-1]) and ((y - x) % 65536 == 1).all()  # next-token targets
    assert rss_file_kb() - before < 16 * 1024, "pages of train.bin pile up in RSS"


def test_accumulating_four_quarter_batches_matches_one_full_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0), verbose=False)
    twin = copy.deepcopy(model)
    x = torch.randint(0, 512, (8, 16))
    y = torch.randint(0, 512, (8, 16))
    results = []
    for m, batches in ((model, [(x, y)]), (twin, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])):
        opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
        scaler = torch.amp.GradScaler('cpu', enabled=False)
        loss = train.train_step(m, opt, scaler, batches, 1e-3, 1.0, train.autocast('cpu', 'float32'))
        results.append((loss.item(), [p.grad.clone() for p in m.parameters()], [p.detach().clone() for p in m.parameters()]))
    (loss_full, grads_full, params_full), (loss_acc, grads_acc, params_acc) = results
    assert loss_acc == pytest.approx(loss_full, rel=1e-6)
    for g_full, g_acc in zip(grads_full, grads_acc):
        torch.testing.assert_close(g_acc, g_full, rtol=1e-5, atol=1e-7)
    for p_full, p_acc in zip(params_full, params_acc):
        torch.testing.assert_close(p_acc, p_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('autocast_dtype', [None, torch.bfloat16])
def test_memory_lean_training_path_matches_plain_autograd(monkeypatch, autocast_dtype):
    """model.py keeps less for backward on CPU (checkpointed attention, lean_kernels.py's GeluLinear and
    byte-mask Dropout); the loss and every gradient must match plain autograd's, dropout masks included."""
    import model as M
    import torch.nn.functional as F
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.2), verbose=False)
    x = torch.randint(0, 512, (4, 16))
    y = torch.randint(0, 512, (4, 16))

    def loss_and_grads():
        torch.manual_seed(123)
        m.zero_grad()
        with torch.autocast('cpu', dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, loss = m(x, y)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters()]

    lean = loss_and_grads()

    def plain_attention(self, x, kv_cache=None, pos=0, last_only=False):  # training passes no cache
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    monkeypatch.setattr(M.CausalSelfAttention, 'forward', plain_attention)
    monkeypatch.setattr(M.MLP, 'forward', lambda self, x: self.dropout(self.c_proj(F.gelu(self.c_fc(x)))))
    plain = loss_and_grads()
    assert lean[0] == plain[0]  # the same forward, bit for bit
    for a, b in zip(lean[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -----------------------------------------------------------------------------
# config and data errors: one clear line, before any training

@pytest.mark.parametrize('args, message', [
    (['--nope=1'], 'unknown option --nope'),
    (['--batch_size=big'], 'batch_size must be int'),
    (['--learning_rate=1e-4', '--min_lr=1e-3'], 'min_lr=0.001 must be between 0 and learning_rate=0.0001'),
    (['--init_from=gpt3'], '--init_from=gpt3: no such checkpoint file or folder'),
    (['--n_head=5'], 'n_embd=32 must be divisible by n_head=5'),
    (['--backend=mpi'], "--backend='mpi' must be in {auto, nccl, gloo}"),
    (['--grad_clip=-1'], '--grad_clip=-1.0 must be in [0, inf)'),
    (['--learning_rate=-1e-3'], '--learning_rate=-0.001 must be in [0, inf)'),
    (['--weight_decay=-0.1'], '--weight_decay=-0.1 must be in [0, inf)'),
    (['--warmup_iters=-5'], '--warmup_iters=-5 must be in [0, inf)'),
    (['--peak_flops=-1'], '--peak_flops=-1.0 must be in [0, inf)'),
    (['--beta2=1.0'], '--beta2=1.0 must be in [0, 1)'),
    (['--eval_iters=0'], '--eval_iters=0 must be in [1, inf)'),
    (['--dropout=1.0'], '--dropout=1.0 must be in [0, 1)'),
    (['--batch_size=None'], 'batch_size cannot be None'),
    (['--dtype=float8'], "dtype 'float8' is not one of auto, float32, bfloat16, float16"),
    (['--max_minutes=-1'], '--max_minutes=-1.0 must be in [0, inf)'),
    (['--seed=-1'], '--seed=-1 must be in [0, 2**63)'),
])
def test_config_errors(args, message, data_dir, tmp_path):
    out = tmp_path / 'out'
    assert message in error_of(train.main, [str(REPO / TINY), f'--data_dir={data_dir}', f'--out_dir={out}',
                                            *args])
    assert not out.exists()


def test_out_dir_and_data_dir_of_the_wrong_kind_or_unwritable(data_dir, tmp_path, readonly_dir):
    """A place train.py could not write stops it at once, not at the first checkpoint minutes
    later; nothing is written anywhere."""
    afile = tmp_path / 'afile'
    afile.write_text('x')
    tiny, data = str(REPO / TINY), f'--data_dir={data_dir}'
    assert f'--out_dir={afile} is a file, not a folder' in error_of(train.main,
                                                                    [tiny, data, f'--out_dir={afile}'])
    assert f'{afile} is a file, not a folder' in error_of(train.main, [tiny, data, f'--out_dir={afile}/run'])
    assert 'is not writable here' in error_of(train.main, [tiny, data, f'--out_dir={readonly_dir}/run'])
    assert f'{afile} is a file, not a folder: pass --data_dir=FOLDER' in error_of(
        train.main, [tiny, f'--data_dir={afile}', f'--out_dir={tmp_path}/run'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile', 'readonly'] and not list(readonly_dir.iterdir())


def test_warmup_longer_than_the_run_is_shortened_with_one_warning(data_dir, tmp_path):
    """`python train.py --max_iters=100` under the recipe's 1000-step warmup: it trains, and one
    line says what was adjusted (config/tiny.py keeps train.py's warmup and learning_rate)."""
    cfg = train.config_defaults(vars(train)) | {'max_iters': 100, 'out_dir': str(tmp_path / 'x')}
    warnings = train.check_config(cfg)
    assert warnings == ['warning: warmup_iters=1000 is more than half the LR decay (100 steps): '
                        'warming up for 10 steps instead (a tenth)']
    assert cfg['warmup_iters'] == 10 and train.get_lr(10, cfg) == train.learning_rate
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=20', '--eval_interval=20',
                  '--gradient_accumulation_steps=1')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('warning: ') == 1 and 'warming up for 2 steps instead' in r.stdout
    assert re.search(r'^iter 1/20 \| loss [\d.]+ \| lr 1.67e-04 ', r.stdout, re.M)  # 5e-4 * 1/3: step 1 of 2
    assert read_log(tmp_path)[-1]['iter'] == 20


def test_config_file_with_unknown_key_is_refused(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_size = 4\nlearning_rat = 1e-3\n")
    r = run_train(str(bad))
    assert one_line_error(r).startswith(f"error: config file {bad} sets unknown key 'learning_rat'; valid keys:")


def test_missing_data_and_missing_checkpoint(tmp_path):
    tiny = str(REPO / TINY)
    assert 'meta.json not found: run `python prepare.py`' in error_of(train.main,
                                                                      [tiny, f'--data_dir={tmp_path / "none"}'])
    assert 'no checkpoint at' in error_of(train.main, [tiny, '--init_from=resume', f'--out_dir={tmp_path}'])


def test_data_that_does_not_match_the_model(data_dir, run_a, tmp_path):
    out, _ = run_a
    # meta.json from another tokenizer: more token ids than the checkpoint's model has
    other = tmp_path / 'other'
    shutil.copytree(data_dir, other)
    meta = json.loads((other / 'meta.json').read_text())
    (other / 'meta.json').write_text(json.dumps({**meta, 'vocab_size': 60000}))
    msg = error_of(train.main, [str(REPO / TINY), '--init_from=resume', f'--out_dir={out}', f'--data_dir={other}'])
    assert 'a 60000-token vocabulary, but the checkpoint in' in msg and 'has 50257' in msg
    # a truncated bin
    (other / 'meta.json').write_text(json.dumps(meta))
    with open(other / 'val.bin', 'r+b') as f:
        f.truncate(1000)
    assert 'truncated or stale' in error_of(train.main, [str(REPO / TINY), f'--data_dir={other}',
                                                         f'--out_dir={tmp_path / "o"}'])


# -----------------------------------------------------------------------------
# end to end

def test_training_writes_checkpoints_log_and_plot(run_a):
    out, stdout = run_a
    rows = read_log(out)
    assert [r['iter'] for r in rows] == [0, 4, 8]
    assert set(rows[0]) == {'iter', 'tokens', 'train_loss', 'val_loss', 'lr', 'tokens_per_s', 'mfu', 'elapsed_s'}
    assert rows[-1]['tokens'] == 8 * 2 * 8 * 32  # iters x accumulation x batch x block
    assert rows[0]['val_loss'] == pytest.approx(math.log(50257), abs=0.2)  # a fresh model guesses uniformly
    assert rows[-1]['val_loss'] < rows[0]['val_loss'] - 0.05  # and it learns (8 steps at train.py's LR: -0.085)
    assert rows[-1]['tokens_per_s'] > 0 and 0 < rows[-1]['mfu'] < 1
    # a row per step, for the loss curve: the printed loss and the schedule's LR
    steps = read_log(out, steps=True)
    assert [r['iter'] for r in steps] == list(range(1, 9))
    assert {r['iter']: r['loss'] for r in steps} == step_losses(stdout)
    cfg = torch.load(out / 'ckpt.pt', weights_only=True)['config']
    assert [r['lr'] for r in steps] == [train.get_lr(i, cfg) for i in range(8)]
    best = torch.load(out / 'best_model_params.pt', weights_only=True)
    assert set(best) == {'model', 'model_args', 'config', 'iter_num', 'best_val_loss', 'budget_fixed', 'wandb_run_id',
                        'started_from'}
    assert best['started_from'] is None  # from scratch; a fine-tune's source (tests/test_finetune.py)
    assert best['best_val_loss'] == min(r['val_loss'] for r in rows[1:])
    assert best['config']['n_embd'] == 32 and best['model_args']['vocab_size'] == 50257
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert set(ckpt) == set(best) | {'optimizer', 'scaler', 'rng'} and ckpt['iter_num'] == 8
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    assert (out / 'loss_curve.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    report = (out / 'report.md').read_text()  # the run's report card, written when training ends
    assert '## Evaluation' in report and '## Sample stories' in report and 'loss_curve.png' in report
    assert re.search(r'^iter 8/8 \| loss [\d.]+ \| lr [\d.e+-]+ \| \d+ ms/iter \| [\d,]+ tok/s \| mfu [\d.]+% \| eta \d+m\d+s$',
                     stdout, re.M)


def test_resume_reproduces_the_uninterrupted_run(run_a, data_dir, tmp_path):
    out_a, stdout_a = run_a
    first = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=4', RUN_A_SCHEDULE)
    assert first.returncode == 0, first.stderr
    # a compiled model's checkpoint has _orig_mod. keys: resume must take them too
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ckpt['model'] = {'_orig_mod.' + k: v for k, v in ckpt['model'].items()}
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    second = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--init_from=resume')
    assert second.returncode == 0, second.stderr
    assert 'resuming from' in second.stdout and 'at iter 4' in second.stdout
    losses_a, losses_b = step_losses(stdout_a), step_losses(second.stdout)
    assert sorted(losses_b) == [5, 6, 7, 8]
    assert all(losses_b[i] == losses_a[i] for i in losses_b)
    rows_a, rows_b = read_log(out_a), read_log(tmp_path)
    assert [r['iter'] for r in rows_b] == [0, 4, 8]
    for key in ('tokens', 'train_loss', 'val_loss', 'lr'):
        assert rows_b[-1][key] == rows_a[-1][key]
    assert read_log(tmp_path, steps=True) == read_log(out_a, steps=True)  # steps 1-4 kept, 5-8 appended
    # the resume point is an evaluation, the start-up measures the matmul peak, dropout is on and
    # each step has 2 micro-batches: none of it may shift the run by a single bit
    assert_same_state(out_a, tmp_path)


def test_eval_only_and_sample_from_the_trained_model(run_a, data_dir):
    out, _ = run_a
    before = (out / 'ckpt.pt').read_bytes()
    r = run_train(f'--out_dir={out}', '--init_from=resume', '--eval_only=True', f'--data_dir={data_dir}')
    assert r.returncode == 0, r.stderr
    assert re.search(r'^eval iter 8: train loss [\d.]+, val loss [\d.]+$', r.stdout, re.M)
    assert (out / 'ckpt.pt').read_bytes() == before
    s = run_script('sample.py', f'--out_dir={out}', '--start=Once upon a time', '--num_samples=1',
                   '--max_new_tokens=12')
    assert s.returncode == 0, s.stderr
    assert 'Once upon a time' in s.stdout


def train_until_sigterm(prefix, *args):
    """train.py with config/tiny.py and args, sent SIGTERM once it prints a line starting with
    prefix. Returns (all of stdout, stderr, exit code)."""
    return run_until_sigterm(prefix, 'train.py', TINY, *args)


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(run_a, data_dir, tmp_path):
    """Stopped by SIGTERM mid-run, then resumed: the same losses as run_a, which ran straight
    through (run_a's 8-step schedule; max_iters and evaluations do not change the stream)."""
    out_a, stdout_a = run_a
    stdout, stderr, returncode = train_until_sigterm('iter 2/', f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                                                     '--max_iters=100000', '--eval_interval=100000', RUN_A_SCHEDULE)
    assert returncode == 128 + signal.SIGTERM, stderr
    stopped = int(re.search(r'^interrupted at iter (\d+): saved .*ckpt.pt; continue with --init_from=resume$',
                            stdout, re.M).group(1))
    assert 2 <= stopped < 8, 'the run went on too long after SIGTERM'
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == stopped
    resumed = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr
    after, straight = step_losses(resumed.stdout), step_losses(stdout_a)
    assert sorted(after) == list(range(stopped + 1, 9))
    assert all(after[i] == straight[i] for i in after)
    assert read_log(tmp_path)[-1]['val_loss'] == read_log(out_a)[-1]['val_loss']
    assert_same_state(out_a, tmp_path)


def wandb_runs(out_dir):
    """The offline W&B runs under out_dir/wandb, oldest first, read from their .wandb files
    (wandb's own reader is gone from its Python package): [(run id, name, project, config,
    {step: {key: value}})]. The files are a LevelDB log (32 KiB blocks of records, each with a
    7-byte header: crc, length, type) of wandb's protobuf Records, after a 7-byte ':W&B' header."""
    from wandb.proto.wandb_internal_pb2 import Record
    runs = []
    for path in sorted(out_dir.glob('wandb/offline-run-*/run-*.wandb')):
        data, pos, part = path.read_bytes(), 7, b''
        assert data[:4] == b':W&B'
        run_id = name = project = None
        config, history = {}, {}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
            part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):  # FULL or LAST ends a record; FIRST and MIDDLE continue it
                continue
            record, part = Record.FromString(part), b''
            which = record.WhichOneof('record_type')
            if which == 'run':
                run_id, name, project = record.run.run_id, record.run.display_name, record.run.project
                config.update((u.key, json.loads(u.value_json)) for u in record.run.config.update)
            elif which == 'config':
                config.update((u.key, json.loads(u.value_json)) for u in record.config.update)
            elif which == 'history':
                items = {(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith('_')}
        runs.append((run_id, name, project, config, history))
    return runs


def test_wandb_logs_the_log_rows_and_config_and_a_resume_continues_the_run(data_dir, tmp_path, monkeypatch):
    """--wandb_log=True with WANDB_MODE=offline (no network): stopped by SIGTERM and resumed,
    the two offline runs are one W&B run (its id kept in ckpt.pt), together holding every row of
    log.jsonl at its iter, under W&B names, and the resolved config."""
    monkeypatch.setenv('WANDB_MODE', 'offline')
    flags = ['--wandb_log=True', '--wandb_project=tinystories', '--wandb_run_name=seed']  # as in docs/training.md
    stdout, stderr, returncode = train_until_sigterm('iter 3/', f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                                                     '--report=False', *flags)
    assert returncode == 128 + signal.SIGTERM, stderr
    stopped = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num']
    assert 3 <= stopped < 8
    resumed = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--init_from=resume', *flags)
    assert resumed.returncode == 0, resumed.stderr

    (id1, name1, project1, config1, hist1), (id2, name2, project2, config2, hist2) = wandb_runs(tmp_path)
    assert id1 == id2 == torch.load(tmp_path / 'ckpt.pt', weights_only=True)['wandb_run_id']
    assert name1 == name2 == 'seed' and project1 == project2 == 'tinystories'
    assert config1['batch_size'] == 8 and config1['init_from'] == 'scratch' and config2['init_from'] == 'resume'
    assert max(hist1) == stopped and min(hist2) == stopped + 1  # the curves join: no gap, no overlap
    logged = {**hist1, **hist2}
    rows = read_log(tmp_path) + read_log(tmp_path, steps=True)
    assert sorted(logged) == sorted({row['iter'] for row in rows}) == list(range(9))
    for row in rows:
        assert runlog.wandb_row(row).items() <= logged[row['iter']].items(), row
    assert {'train/loss', 'val/loss', 'lr', 'mfu', 'tokens_per_s', 'step/loss', 'step/lr'} <= logged[8].keys()


def test_wandb_log_without_wandb_installed_says_how_to_install_it(data_dir, tmp_path, monkeypatch):
    shim = tmp_path / 'no_wandb'
    shim.mkdir()
    (shim / 'wandb.py').write_text("raise ImportError(\"No module named 'wandb'\")\n")
    monkeypatch.setenv('PYTHONPATH', str(shim))
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--wandb_log=True')
    assert one_line_error(r) == (
        'error: --wandb_log=True needs the wandb package, which is not installed: pip install wandb')
    assert not (tmp_path / 'out').exists()


def test_wandb_log_without_an_api_key_stops_with_one_line(data_dir, tmp_path, monkeypatch):
    """Online, no key and no terminal to ask for one (a notebook's `!` line, a batch job): one
    line saying how to log in, no traceback, and nothing sent anywhere (wandb stops first)."""
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    monkeypatch.setenv('WANDB_MODE', 'online')
    monkeypatch.setenv('HOME', str(tmp_path))  # no ~/.netrc with a key
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--wandb_log=True')
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith('error: W&B could not start a run')
    assert 'run `wandb login` (or set WANDB_API_KEY)' in r.stderr and 'Traceback' not in r.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_a, data_dir, tmp_path):
    out, _ = run_a
    shutil.copytree(out, tmp_path / 'run')
    before = (tmp_path / 'run' / 'ckpt.pt').read_bytes()
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path / "run"}', '--init_from=resume',
                  '--learning_rate=1e30', '--max_iters=20')
    assert r.returncode == 1
    assert re.search(r'^error: loss is (nan|inf|-inf) at iter \d+: training diverged', r.stderr, re.M)
    assert (tmp_path / 'run' / 'ckpt.pt').read_bytes() == before


TORCHRUN = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


@pytest.fixture(scope='module')
def run_ddp(data_dir, tmp_path_factory):
    """`torchrun --nproc_per_node=2 train.py` with config/tiny.py: 2 processes over gloo."""
    out = tmp_path_factory.mktemp('run_ddp')
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={out}', launcher=TORCHRUN)
    assert r.returncode == 0, r.stderr
    return out, r


def test_ddp_two_processes_over_gloo(run_ddp, data_dir):
    tmp_path, r = run_ddp
    assert '2 process(es) x 1 micro-batches' in r.stdout
    assert len(re.findall(r'^iter 8/8 ', r.stdout, re.M)) == 1  # only rank 0 logs
    rows = read_log(tmp_path)
    assert [row['iter'] for row in rows] == [0, 4, 8] and rows[-1]['val_loss'] < rows[0]['val_loss']
    assert [row['iter'] for row in read_log(tmp_path, steps=True)] == list(range(1, 9))  # rank 0 writes
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert len(ckpt['rng']) == 2  # each rank's random streams, for an exact resume
    assert not torch.equal(ckpt['rng'][0]['data'], ckpt['rng'][1]['data'])  # ranks draw different windows
    assert not any(k.startswith('module.') for k in ckpt['model'])
    bad = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--gradient_accumulation_steps=3',
                    launcher=TORCHRUN)
    assert bad.returncode != 0
    assert 'error: gradient_accumulation_steps=3 must be divisible by the number of processes (2)' in bad.stderr


# -----------------------------------------------------------------------------
# --max_minutes: a time budget instead of a step count

def test_cpu_recipe_takes_bf16_only_where_the_cpu_multiplies_it(monkeypatch, tmp_path):
    """config/tinystories_cpu.py as `python train.py config/tinystories_cpu.py` reads it: a
    15-minute budget; bf16 autocast on a CPU with AVX512-BF16 or AMX, else fp32 (emulated bf16
    would be slower)."""
    import device
    def recipe():
        cfg = train.parse_config(train.config_defaults(vars(train)),
                                 [str(REPO / 'config/tinystories_cpu.py'), f'--out_dir={tmp_path}'])
        assert train.check_config(cfg) == []
        return cfg
    cfg = recipe()
    assert cfg['max_minutes'] == 15 and cfg['lr_decay_iters'] == 0 and cfg['device'] == 'cpu'
    assert cfg['dtype'] == ('bfloat16' if device.cpu_has_bf16_matmul() else 'float32')
    for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    assert recipe()['dtype'] == 'float32'
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True)
    assert recipe()['dtype'] == 'bfloat16'


def fitted_max_iters(stdout, budget):
    return int(re.search(rf'^--max_minutes={budget}: max_iters=(\d+) \(', stdout, re.M).group(1))


def test_max_minutes_ends_the_whole_run_in_time(data_dir, tmp_path):
    """A 45-second budget, timed as a user times it (the process, from start to exit), with the
    report card: its full pass over val.bin and ten stories are about half of the budget here."""
    t0 = time.time()
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_minutes=0.75', report=True)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr
    fitted = fitted_max_iters(r.stdout, 0.75)
    assert f'done: {fitted} iters' in r.stdout and (tmp_path / 'report.md').exists()
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['budget_fixed'] and ckpt['config']['max_iters'] == fitted == ckpt['iter_num']
    assert 0.85 * 45 < wall < 1.15 * 45, f"the run took {wall:.1f} s for a 45 s budget"


def test_max_minutes_fixes_the_schedule_once_and_a_resume_keeps_it(data_dir, tmp_path):
    """Stopped by SIGTERM after max_iters was fitted, then resumed with the same command: the run
    ends at the fitted max_iters with the weights, optimizer state and random streams of a plain
    `--max_iters=N` run, bit for bit. So the budget only chose N: the warmup (as long as the
    calibration) and the cosine over N steps are the same schedule, and the resume kept N. (The
    warmup is set here because a warmup cut to N // 10 at the fit, as tiny.py's 1000 steps would
    be, is cut only after the calibration steps ran under the uncut one.)"""
    budget = ['--max_minutes=0.3', '--warmup_iters=10', '--eval_interval=20']
    stdout, stderr, returncode = train_until_sigterm(f'iter {train.CALIBRATION_STEPS + 3}/', f'--data_dir={data_dir}',
                                                     f'--out_dir={tmp_path}', '--report=False', *budget)
    assert returncode == 128 + signal.SIGTERM, stderr
    fitted = fitted_max_iters(stdout, 0.3)
    assert fitted > train.CALIBRATION_STEPS + 10
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['budget_fixed'] and ckpt['config']['max_iters'] == fitted and ckpt['iter_num'] < fitted
    resumed = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--init_from=resume', *budget)
    assert resumed.returncode == 0, resumed.stderr
    assert f'resume: max_iters={fitted}, as --max_minutes fitted it' in resumed.stdout
    assert '--max_minutes=0.3: max_iters=' not in resumed.stdout  # not fitted again
    plain = tmp_path / 'plain'
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={plain}', f'--max_iters={fitted}', *budget[1:])
    assert r.returncode == 0, r.stderr
    assert_same_state(tmp_path, plain)


# -----------------------------------------------------------------------------
# the GPU users' paths, run for real on the CPU: CPU autocast takes float16 and bfloat16,
# torch.amp.GradScaler('cpu') is the GradScaler a Colab T4 runs on CUDA, and inductor compiles
# for the CPU. Each is compared with run_a, the fp32 eager reference.

def max_gap(stdout, reference):
    losses, ref = step_losses(stdout), step_losses(reference)
    assert losses and set(losses) <= set(ref)
    return max(abs(losses[i] - ref[i]) for i in losses)


# Low precision vs fp32 over the first 4 steps: fp16 keeps 11 significant bits and bf16 8, so
# matmul outputs carry relative errors of ~5e-4 and ~4e-3 that mostly average out over a
# loss of 512 tokens: measured gaps are under 1e-4 (the printed losses agree to 4 decimals).
# 0.005 is far above that and below what a broken path moves: under train.py's schedule
# (tiny.py sets none: 5e-4, no warmup over 8 steps) one optimizer step skipped among the first
# three moves a later step's loss by 0.014 or more (measured by skipping each in turn).
LOW_PRECISION_TOLERANCE = 0.005


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_low_precision_autocast_trains_like_fp32(dtype, run_a, data_dir, tmp_path):
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', f'--dtype={dtype}', '--max_iters=4', RUN_A_SCHEDULE)
    assert r.returncode == 0, r.stderr
    assert f'{dtype} on cpu' in r.stdout
    assert sorted(step_losses(r.stdout)) == [1, 2, 3, 4]
    assert max_gap(r.stdout, run_a[1]) < LOW_PRECISION_TOLERANCE
    scaler = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['scaler']
    if dtype == 'float16':  # the scaler is on, and no step overflowed at its initial scale
        assert scaler['scale'] == 2.0 ** 16 and scaler['_growth_tracker'] == 4
    else:  # bf16 has fp32's range: no scaler
        assert not scaler


# torch.compile vs eager: inductor draws dropout masks from its own generator, so the runs take
# different masks; measured gaps ~5e-3 over 8 steps (4.5e-3 alone, 4.8e-3 under DDP). 0.01 is
# twice that and under a skipped step: one skipped among the first five moves a later step's
# loss by 0.014 or more under train.py's schedule (measured by skipping each in turn).
COMPILE_TOLERANCE = 0.01


@pytest.fixture(scope='module')
def run_compiled(data_dir, tmp_path_factory):
    """run_a with --compile=True (the first run pays inductor's compile; later ones hit its cache)."""
    out = tmp_path_factory.mktemp('run_compiled')
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={out}', '--compile=True', timeout=600)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_compiled_training_matches_eager(run_a, run_compiled):
    out, stdout = run_compiled
    assert sorted(step_losses(stdout)) == list(range(1, 9))
    assert max_gap(stdout, run_a[1]) < COMPILE_TOLERANCE
    assert abs(read_log(out)[-1]['val_loss'] - read_log(run_a[0])[-1]['val_loss']) < COMPILE_TOLERANCE
    for name in ('ckpt.pt', 'best_model_params.pt'):  # loadable anywhere: no _orig_mod. prefixes
        keys = torch.load(out / name, weights_only=True)['model']
        assert keys.keys() == torch.load(run_a[0] / name, weights_only=True)['model'].keys()


def test_a_compiled_run_resumes_exactly(run_compiled, data_dir, tmp_path):
    first = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--compile=True', '--max_iters=4', RUN_A_SCHEDULE)
    assert first.returncode == 0, first.stderr
    second = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--compile=True', '--init_from=resume')
    assert second.returncode == 0, second.stderr
    assert_same_state(run_compiled[0], tmp_path)


def test_ddp_with_max_minutes_and_wandb(data_dir, tmp_path, monkeypatch):
    """torchrun, 2 gloo processes, --max_minutes: rank 0 fits max_iters and both ranks stop there
    (a rank that went on alone would hang in the next all-reduce). With --wandb_log only rank 0
    logs to W&B, and the W&B config gets the fitted max_iters."""
    monkeypatch.setenv('WANDB_MODE', 'offline')
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_minutes=0.3', '--wandb_log=True',
                  launcher=TORCHRUN)
    assert r.returncode == 0, r.stderr
    fitted = fitted_max_iters(r.stdout, 0.3)
    assert r.stdout.count('--max_minutes=0.3: max_iters=') == 1 and f'done: {fitted} iters' in r.stdout
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['budget_fixed'] and ckpt['iter_num'] == fitted and len(ckpt['rng']) == 2
    [(_, _, project, config, history)] = wandb_runs(tmp_path)  # one W&B run: rank 1 logs nothing
    assert project == 'slm' and config['max_iters'] == fitted and sorted(history) == list(range(fitted + 1))


def test_ddp_with_compile(run_ddp, data_dir, tmp_path):
    """torchrun, 2 gloo processes, --compile=True: DDP wraps the compiled model."""
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--compile=True', launcher=TORCHRUN,
                  timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r'^iter 8/8 ', r.stdout, re.M)) == 1  # only rank 0 logs
    assert max_gap(r.stdout, run_ddp[1].stdout) < COMPILE_TOLERANCE
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert len(ckpt['rng']) == 2 and ckpt['model'].keys() == torch.load(run_ddp[0] / 'ckpt.pt', weights_only=True)['model'].keys()


# -----------------------------------------------------------------------------
# --optimizer=muon (optim.py) and --lr_schedule=wsd through train.py

MUON = ['--optimizer=muon', '--lr_schedule=wsd', '--decay_fraction=0.5']


def test_a_muon_run_with_wsd_resumes_exactly(data_dir, tmp_path):
    """Muon + AdamW and the warmup-stable-decay schedule: a run stopped at iter 4 and resumed ends
    where the straight 8-step run does, bit for bit, both optimizers' state included."""
    straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={straight}', *MUON)
    assert r.returncode == 0, r.stderr
    lrs = [row['lr'] for row in read_log(straight, steps=True)]
    assert lrs[:5] == [lrs[0]] * 5 and lrs[4] > lrs[5] > lrs[6] > lrs[7]  # held, then a line down
    state = torch.load(straight / 'ckpt.pt', weights_only=True)['optimizer']['state']
    assert sum('momentum' in s for s in state.values()) == 2 * 4 and sum('exp_avg' in s for s in state.values()) > 4
    first = run_train(f'--data_dir={data_dir}', f'--out_dir={stopped}', *MUON, '--max_iters=4', RUN_A_SCHEDULE)
    assert first.returncode == 0, first.stderr
    second = run_train(f'--data_dir={data_dir}', f'--out_dir={stopped}', *MUON, '--init_from=resume')
    assert second.returncode == 0, second.stderr
    assert_same_state(straight, stopped)
    assert read_log(stopped)[-1]['val_loss'] == read_log(straight)[-1]['val_loss'] < read_log(straight)[0]['val_loss']


def test_muon_under_ddp_with_compile(run_ddp, data_dir, tmp_path):
    """torchrun, 2 gloo processes, --compile=True, --optimizer=muon: the ranks agree (rank 0 logs,
    every rank steps the same weights) and the model learns."""
    r = run_train(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--compile=True', '--optimizer=muon',
                  launcher=TORCHRUN, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r'^iter 8/8 ', r.stdout, re.M)) == 1
    rows = read_log(tmp_path)
    assert rows[-1]['val_loss'] < rows[0]['val_loss']
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert len(ckpt['rng']) == 2 and any('momentum' in s for s in ckpt['optimizer']['state'].values())
