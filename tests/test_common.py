"""The shared modules every script relies on: config flags and errors, atomic files (common.py),
device choice (device.py), the tokenizer and the data on disk (data.py), checked loading
(checkpoints.py), the run log and its plot (runlog.py); and the one-way flow of imports."""
import ast
import importlib
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import checkpoints
import common
from conftest import error_of
from data import open_split
import device
from model import GPT, GPTConfig
import runlog

DEFAULTS = {'batch_size': 32, 'learning_rate': 6e-4, 'compile': False, 'out_dir': 'out', 'top_k': None}


def test_flags_override_defaults_with_their_types():
    cfg = common.parse_config(DEFAULTS, ['--batch_size=8', '--learning_rate=1e-3', '--compile=True',
                                         '--out_dir=runs/a', '--top_k=50'])
    assert cfg == {'batch_size': 8, 'learning_rate': 1e-3, 'compile': True, 'out_dir': 'runs/a', 'top_k': 50}
    assert common.parse_config(DEFAULTS, ['--learning_rate=1'])['learning_rate'] == 1.0  # int is fine for a float
    assert common.parse_config(DEFAULTS, ['--compile'])['compile'] is True  # bare boolean flag
    assert common.parse_config(DEFAULTS, ['--out_dir=123'])['out_dir'] == '123'  # a path stays a string


def test_config_file_then_flags(tmp_path):
    f = tmp_path / 'cfg.py'
    f.write_text("import math\nbatch_size = 4\nlearning_rate = 3e-4 * math.sqrt(4)\n")
    cfg = common.parse_config(DEFAULTS, [str(f), '--batch_size=2'])
    assert cfg['batch_size'] == 2 and cfg['learning_rate'] == pytest.approx(6e-4)


def test_bad_config_is_one_line_with_the_fix(tmp_path):
    assert 'unknown option --batchsize' in error_of(common.parse_config, DEFAULTS, ['--batchsize=8'])
    assert 'valid keys: batch_size' in error_of(common.parse_config, DEFAULTS, ['--nope=1'])
    assert 'batch_size must be int' in error_of(common.parse_config, DEFAULTS, ['--batch_size=eight'])
    assert 'compile must be bool' in error_of(common.parse_config, DEFAULTS, ['--compile=1'])
    assert 'needs a value' in error_of(common.parse_config, DEFAULTS, ['--batch_size'])
    assert 'batch_size cannot be None' in error_of(common.parse_config, DEFAULTS, ['--batch_size=None'])
    assert 'out_dir holds a NUL byte' in error_of(common.parse_config, DEFAULTS, ['--out_dir=a\0b'])
    assert common.parse_config({**DEFAULTS, 'top_k': 200}, ['--top_k=None'], nullable=('top_k',))['top_k'] is None
    assert 'not found' in error_of(common.parse_config, DEFAULTS, ['missing.py'])
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_size = 4\nlearnig_rate = 1e-3\n")
    assert "unknown key 'learnig_rate'" in error_of(common.parse_config, DEFAULTS, [str(bad)])
    broken = tmp_path / 'broken.py'
    broken.write_text("batch_size = (\n")
    assert 'failed to run' in error_of(common.parse_config, DEFAULTS, [str(broken)])


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'x.json'
    common.save_json({'a': 1}, path)

    def crash(f):
        f.write(b'half a fi')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(path, crash)
    assert json.loads(path.read_text()) == {'a': 1}
    assert os.listdir(tmp_path) == ['x.json']  # no temp file left behind


def write_data(tmp_path, tokens, vocab_size=50257, meta_tokens=None):
    np.asarray(tokens, dtype=np.uint16).tofile(tmp_path / 'val.bin')
    n = len(tokens) if meta_tokens is None else meta_tokens
    common.save_json({'vocab_size': vocab_size, 'dtype': 'uint16',
                      'splits': {'val': {'file': 'val.bin', 'tokens': n}}}, tmp_path / 'meta.json')


def test_open_split_checks_the_bins_against_meta(tmp_path):
    assert 'run `python prepare.py`' in error_of(open_split, tmp_path, 'val')
    write_data(tmp_path, [1, 2, 3, 50256])
    assert list(open_split(tmp_path, 'val', 50257)) == [1, 2, 3, 50256]
    assert "no 'train' split" in error_of(open_split, tmp_path, 'train')
    assert 'vocab_size=50257' in error_of(open_split, tmp_path, 'val', 1000)
    write_data(tmp_path, [1, 2, 3], meta_tokens=4)  # truncated bin
    assert 'truncated or stale' in error_of(open_split, tmp_path, 'val')
    (tmp_path / 'meta.json').write_text('{"splits": ')
    assert 'unreadable' in error_of(open_split, tmp_path, 'val')


def tiny_checkpoint(prefix=''):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, verbose=False)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    return model, {'model': state, 'model_args': vars(cfg)}


@pytest.mark.parametrize('prefix', ['', '_orig_mod.', 'module.', 'module._orig_mod.'])
def test_load_model_accepts_compiled_and_ddp_state_dicts(tmp_path, prefix):
    model, ckpt = tiny_checkpoint(prefix)
    common.torch_save(ckpt, tmp_path / 'ckpt.pt')
    loaded, _ = checkpoints.load_model(str(tmp_path / 'ckpt.pt'))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    assert 'run `python train.py` first' in error_of(checkpoints.read_checkpoint, str(tmp_path / 'none.pt'))
    _, ckpt = tiny_checkpoint()
    common.torch_save(ckpt, tmp_path / 'good.pt')
    data = (tmp_path / 'good.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 2])
    assert 'corrupt, truncated' in error_of(checkpoints.read_checkpoint, str(tmp_path / 'cut.pt'))
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    assert 'not an SLM checkpoint' in error_of(checkpoints.read_checkpoint, str(tmp_path / 'other.pt'))
    ckpt['model_args']['n_embd'] = 32
    common.torch_save(ckpt, tmp_path / 'mismatch.pt')
    assert 'does not match' in error_of(checkpoints.load_model, str(tmp_path / 'mismatch.pt'))


def test_device_and_dtype_choice():
    # auto: what torch reports here (CI has no GPU; a user's machine may)
    mps = getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()
    assert device.pick_device('auto') == ('cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu')
    assert device.pick_device('cpu') == 'cpu'
    if not torch.cuda.is_available():
        assert 'not usable here' in error_of(device.pick_device, 'cuda')
    assert '--device=cpu' in error_of(device.pick_device, 'nonsense')
    assert device.pick_dtype('auto', 'cpu') == 'float32'
    assert device.pick_dtype('bfloat16', 'cpu') == 'bfloat16'
    assert 'not one of' in error_of(device.pick_dtype, 'fp8', 'cpu')


def test_a_tokenizer_download_that_never_answers_fails_in_one_line(tmp_path):
    # a "proxy" that accepts connections and never answers: the BPE download would hang forever
    import socket
    import subprocess
    import sys
    import time
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen()
    port = silent.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower()}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty-cache'), HTTPS_PROXY=f'http://127.0.0.1:{port}',
               HTTP_PROXY=f'http://127.0.0.1:{port}')
    t0 = time.time()
    with silent:
        r = subprocess.run([sys.executable, '-c', 'import data; data.get_tokenizer(timeout=2)'],
                           cwd=os.path.dirname(common.__file__), capture_output=True, text=True, env=env, timeout=60)
    assert time.time() - t0 < 30
    assert r.returncode == 1 and r.stderr.startswith('error:') and len(r.stderr.strip().splitlines()) == 1
    assert 'no answer in 2 s' in r.stderr and 'TIKTOKEN_CACHE_DIR' in r.stderr


@pytest.mark.parametrize('script', ['prepare', 'train', 'sample', 'eval', 'export', 'plot', 'bench'])
def test_help_lists_every_key_with_its_default_and_meaning(script, capsys):
    """--help is the reference for the flags: every key, its default, and the comment beside
    the default in the script, one line each; exit code 0."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        module.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: python {script}.py [config.py ...] [--key=value ...]')
    for key, default in common.config_defaults(vars(module)).items():
        m = re.search(rf'^  --{key}=(\S+) +(\S.*)$', out, re.M)
        assert m, f"--{key} has no line with a meaning in {script}.py --help"
        assert m.group(1) == repr(default)


def test_read_log_skips_a_row_being_written(tmp_path):
    """plot.py may read log.jsonl while train.py appends to it: a partial last line (or a damaged
    one) is skipped, the whole rows are kept; export.py, eval.py and train.py read it the same way."""
    row = {'iter': 0, 'tokens': 0, 'train_loss': 10.9, 'val_loss': 10.9, 'lr': 1e-4}
    log = tmp_path / 'log.jsonl'
    log.write_text(json.dumps(row) + '\n' + json.dumps({**row, 'iter': 4}) + '\n{"iter": 8, "tok')
    assert [r['iter'] for r in runlog.read_log(str(log))] == [0, 4]
    assert runlog.read_log(str(tmp_path / 'none.jsonl')) == []
    assert runlog.plot_log(str(tmp_path)).endswith('loss_curve.png')


def synthetic_log(path, n=400, every=50):
    """A run as train.py logs it: a step row per step (loss falls from ln 50257 = 10.8 to ~3 in the
    first 5%, then slowly, with noise), an evaluation row every `every` steps, warmup 20 + cosine."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for it in range(n + 1):
        lr = 1e-3 * min(1, (it + 1) / 21) * (0.55 + 0.45 * math.cos(math.pi * it / n))
        loss = 3 + 7.8 * math.exp(-it / 4) + 0.5 * (1 - it / n) + 0.1 * torch.randn((), generator=g).item()
        if it:
            rows.append({'iter': it, 'tokens': it * 1000, 'loss': loss, 'lr': lr})
        if it % every == 0:
            rows.append({'iter': it, 'tokens': it * 1000, 'train_loss': loss, 'val_loss': loss + 0.05, 'lr': lr})
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return rows


def test_loss_curve_shows_every_step_and_the_part_of_training_that_matters(tmp_path):
    rows = synthetic_log(tmp_path / 'log.jsonl')
    fig = runlog.loss_figure(str(tmp_path))
    ax, lr_ax = fig.axes
    raw, mean, val = ax.get_lines()
    assert len(raw.get_xdata()) == len(mean.get_xdata()) == 400 and len(val.get_xdata()) == 9
    # the LR as the schedule really is: one point per step, warmup included
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == [r['lr'] for r in rows if 'loss' in r]
    # the running mean smooths the noise: much smaller step-to-step changes than the raw losses
    later = slice(100, None)
    assert np.abs(np.diff(mean.get_ydata()[later])).mean() < 0.3 * np.abs(np.diff(raw.get_ydata()[later])).mean()
    # the y-range: not stretched up to the first steps' 10.8, down to below the lowest val loss
    low, high = ax.get_ylim()
    assert high < 5 and low < min(r['val_loss'] for r in rows if 'val_loss' in r)
    # a log from before step rows existed: the evaluations alone still plot
    evals = [r for r in rows if 'val_loss' in r]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in evals))
    assert len(runlog.loss_figure(str(tmp_path)).axes[0].get_lines()) == 2


SCRIPTS = ['prepare', 'train', 'sample', 'eval', 'export', 'plot', 'bench', 'serve']


def imported_modules(name):
    """Every module a file imports, at the top or inside a function."""
    tree = ast.parse((common_dir() / f'{name}.py').read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split('.')[0])
    return found


def common_dir():
    from pathlib import Path
    return Path(common.__file__).parent


def test_imports_flow_one_way():
    """Scripts import the shared modules (every other .py beside them: common, model, kernels,
    engine, ...), never each other (bench.py alone times train.py's step and prepare.py's pipeline,
    and says so); a shared module imports no script, and the shared ones import each other
    without cycles (model.py imports kernels and engine, which know nothing of model.py)."""
    shared = sorted(p.stem for p in common_dir().glob('*.py') if p.stem not in SCRIPTS)
    assert {'common', 'device', 'data', 'checkpoints', 'hf', 'runlog', 'model', 'kernels', 'engine'} <= set(shared)
    uses = {name: imported_modules(name) & set(shared) - {name} for name in shared}
    for name in shared:
        assert not imported_modules(name) & set(SCRIPTS), name
        reached, todo = set(), list(uses[name])
        while todo:  # every shared module name imports, directly or through others
            m = todo.pop()
            if m not in reached:
                reached.add(m)
                todo += uses[m]
        assert name not in reached, f"{name} imports itself through {sorted(reached)}"
    assert 'model' not in uses['engine'] | uses['kernels']
    for name in SCRIPTS:
        allowed = {'train', 'prepare'} if name == 'bench' else set()
        assert imported_modules(name) & set(SCRIPTS) <= allowed, name
