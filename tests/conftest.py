"""Shared test setup: offline tokenizer files and the real TinyStories sample in ../shared.

The rule for this suite: a fixture (or a config such as config/tiny.py) may shrink sizes
and step counts, but it must never switch off code that the default run executes. Where
a shortcut is needed for speed, another test covers the default path, and the shortcut
says which. (config/tiny.py once set peak_flops, which skipped the start-up matmul
measurement, and so hid that it broke exact resume.)
"""
import ast
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
STORIES = SHARED / 'data' / 'tinystories'

# the GPT-2 BPE files travel in ../shared; tests never touch the network
os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(SHARED / 'tiktoken-cache'))
sys.path.insert(0, str(REPO))


def error_of(fn, *args, **kwargs):
    """The one-line message a user sees when fn stops the script (in-process: its SystemExit)."""
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def one_line_error(result):
    """The one line a user sees when a script run by run_script stops: exit code 1, stderr that
    one line, starting 'error: ', no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    return lines[0]


def script_env():
    # one thread: a tiny model runs faster and steadier on a shared CPU than with two
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def run_script(script, *args, timeout=300, env=None, **kw):
    """`python SCRIPT ARGS` as a user runs it, from the repository root, no stdin; returns the
    CompletedProcess (text stdout and stderr). script may be '-c' or '-m' with what follows in args.
    env: variables set over script_env() (None removes one); kw goes to subprocess.run
    (e.g. preexec_fn)."""
    full_env = script_env()
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = str(value)
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=full_env, timeout=timeout, **kw)


def start_script(script, *args, **kw):
    """script started as run_script runs it, not waited for: the Popen, its stdout and stderr
    piped as text (kw goes to subprocess.Popen and may say otherwise)."""
    kw = {'stdout': subprocess.PIPE, 'stderr': subprocess.PIPE, **kw}
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, env=script_env(), **kw)


def run_until_sigterm(prefix, script, *args, timeout=120):
    """script started by start_script, sent SIGTERM once it prints a line starting with prefix.
    Returns (all of stdout, stderr, exit code)."""
    proc = start_script(script, *args)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(prefix):
                proc.send_signal(signal.SIGTERM)
                break
        rest, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return ''.join(seen) + rest, stderr, proc.returncode


def prepare_stories(out, train_file, val_file):
    """prepare.py as a user runs it, on local story files, into out; returns out."""
    r = run_script('prepare.py', f'--train_files={train_file}', f'--val_files={val_file}', f'--out_dir={out}')
    assert r.returncode == 0, r.stderr
    return out


TINY_MODEL = dict(block_size=16, n_layer=1, n_head=2, n_embd=16)  # over GPTConfig's: GPT-2's vocabulary


def tiny_checkpoint(path, prefix='', seed=0, config=None, **model_overrides):
    """A small random GPT (TINY_MODEL, then model_overrides; torch.manual_seed(seed)) saved at path
    as train.py saves best_model_params.pt: its keys, the run config (train.py's defaults with the
    model's shape, then config), iter_num 0 and best_val_loss inf, as a run that has not evaluated
    yet. prefix goes before every weight's name: '_orig_mod.' as a torch.compile'd model's, 'module.'
    as DDP's. Returns path."""
    from dataclasses import asdict

    import torch

    import train
    from common import torch_save
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model_args = asdict(GPTConfig(**{**TINY_MODEL, **model_overrides}))
    model = GPT(GPTConfig(**model_args), verbose=False)
    defaults = train.config_defaults(vars(train))
    run_config = {**defaults, **{k: v for k, v in model_args.items() if k in defaults}, **(config or {})}
    torch_save({'model': {prefix + k: v for k, v in model.state_dict().items()}, 'model_args': model_args,
                'config': run_config, 'iter_num': 0, 'best_val_loss': float('inf'), 'budget_fixed': False,
                'wandb_run_id': None, 'started_from': None}, path)
    return path


def read_log(out_dir, steps=False):
    """log.jsonl's evaluation rows, or with steps=True its per-step rows (every line must parse)."""
    with open(Path(out_dir) / 'log.jsonl') as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if ('val_loss' in r) != steps]


def assert_same_state(out_a, out_b):
    """The ckpt.pt of two runs hold the same step, weights, optimizer state and random
    streams, bit for bit (torch.equal): one run continued exactly where the other went."""
    import torch
    a, b = (torch.load(Path(out) / 'ckpt.pt', weights_only=True) for out in (out_a, out_b))
    assert a['iter_num'] == b['iter_num']
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), f"weights {k} differ"
    state_a, state_b = a['optimizer']['state'], b['optimizer']['state']
    assert state_a.keys() == state_b.keys() and a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    for i in state_a:
        for k in state_a[i]:
            assert torch.equal(torch.as_tensor(state_a[i][k]), torch.as_tensor(state_b[i][k])), \
                f"optimizer state {i}.{k} differs"
    for ra, rb in zip(a['rng'], b['rng']):
        assert torch.equal(ra['torch'], rb['torch']) and torch.equal(ra['data'], rb['data'])


# -----------------------------------------------------------------------------
# the recipes users run (config/*.py and SLM.ipynb's first cell), shrunk: test_configs.py runs
# each, test_notebook.py the notebook's; both check the LR schedule a recipe's run logs

# Sizes only: a 1-layer, 16-wide model on 2 x 16-token batches, one batch per evaluation
# (a step is ~15 ms here, nearly all of it the 50,257-way output layer).
SIZES = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--batch_size=2', '--block_size=16',
         '--gradient_accumulation_steps=1', '--eval_iters=1']
CPU = ['--device=cpu', '--dtype=float32']  # for a config that would take a GPU where there is one
BUDGET_MINUTES = 0.25  # --max_minutes for a time-budget recipe: ~800 fitted steps of SIZES here
# The one shortcut: the report card at the end (eval.py --report: a full pass over val.bin and
# ten stories, ~20 s here whatever the model) does not touch the schedule. It runs in
# test_train.py's run_a and test_max_minutes_ends_the_whole_run_in_time (a budget that includes
# it) and in test_notebook.py, which runs the notebook's recipe line with it.
SHORTCUTS = ['--report=False']

# config file -> the flags that shrink its run. test_configs.py's test_every_config_file_has_an_entry
# fails for a file in config/ without one. Step counts are sized for assert_lr_schedule_ends_at_min_lr
# below: the last step's LR is
# get_lr(max_iters - 1), which sits (lr - min_lr) * sin^2(pi / 2n) ~ pi^2 / 4n^2 of the way
# above min_lr, n = the steps after the warmup; under 1% needs n >= 16.
SHRINK = {
    # its own 8 steps (warmup 1000 cut to 8 // 10 = 0) end 3.8% above min_lr: 40 steps, warmup
    # cut to 4, end 0.19% above (its sizes shrunk further: its 512 tokens a step take 250 ms)
    'config/tiny.py': [*SIZES, '--max_iters=40'],
    # docs/training.md's "Checking a GPU machine" line: 300 steps, warmup cut to 30, 270 steps of cosine
    'config/tinystories.py': [*SIZES, *CPU, '--max_iters=300', '--eval_interval=100'],
    # a 15-minute budget: a short one (its 50-step warmup stays; max_iters is fitted to ~800)
    'config/tinystories_cpu.py': [*SIZES, f'--max_minutes={BUDGET_MINUTES}'],
    # init_from='gpt2' is a hub download the tests cannot make: a tiny local model of SIZES'
    # shape ({source}) stands in; the shape comes from it, so no shape flags; its own 300 steps
    # and 20-step warmup as shipped
    'config/finetune_tinystories.py': ['--init_from={source}', '--batch_size=2', '--block_size=16',
                                       '--gradient_accumulation_steps=1', '--eval_iters=1', *CPU],
}


def notebook_recipes():
    """The TRAIN values of SLM.ipynb's first cell, one per hardware, checked to be what its
    training cell runs: `train.py {TRAIN}` with only the data and output folders after it."""
    import nbformat  # a test-only requirement, as the notebook tests need it
    nb = nbformat.read(REPO / 'SLM.ipynb', as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == 'code']
    recipes = re.findall(r"^\s*TRAIN = '([^']+)'", code[0], re.M)
    [train_line] = [line for src in code for line in src.splitlines() if line.startswith('!') and ' train.py ' in line]
    assert train_line == '!{sys.executable} train.py {TRAIN} --data_dir={DATA_DIR} --out_dir={OUT_DIR}', train_line
    return recipes


def shrink_flags(recipe, budget=BUDGET_MINUTES, shortcuts=SHORTCUTS):
    """The flags appended to a recipe line (a config file, then the line's own flags) to shrink
    it: its config's SHRINK flags; a line or config with a time budget (--max_minutes) gets a
    short one, budget minutes, instead of a step count. The flags come last, so they win: a GPU
    line's --dtype turns into CPU's float32 (fp16 is emulated on a CPU, ~100 ms a step here,
    and a slower CPU would fit too few steps to check; fp16 and bf16 autocast on the CPU are
    tested in test_train.py)."""
    config, *own = recipe.split()
    flags = list(SHRINK[config])
    if any(f.startswith('--max_minutes=') for f in own + flags):
        flags = [f for f in flags if not f.startswith(('--max_iters=', '--max_minutes='))]
        flags.append(f'--max_minutes={budget:g}')
    return flags + list(shortcuts)


def printed_config(stdout):
    """The config train.py prints before training ('config:', then '  key = value' lines)."""
    parts = re.split(r'^config:\r?\n', stdout, maxsplit=1, flags=re.M)
    assert len(parts) == 2, f"no 'config:' block in the output: {stdout[:2000]!r}"
    block = parts[1]
    cfg = {}
    for line in block.splitlines():
        m = re.fullmatch(r'  (\w+) = (.*?)\r?', line)
        if not m:
            break
        cfg[m.group(1)] = ast.literal_eval(m.group(2))
    return cfg


def assert_lr_schedule_ends_at_min_lr(out_dir, stdout):
    """The LR of every step as log.jsonl has it (a step row: {iter, tokens, loss, lr}, the LR
    that step used, get_lr(iter - 1)): it rises through the warmup to learning_rate, never goes
    above it, then falls at every step to min_lr (within 1% of the span) at the last one; the
    evaluation at the end is at min_lr. The run's length and warmup are read from its output,
    as a user reads them: max_iters (or the one --max_minutes fitted) and warmup_iters, or the
    warning that cut it. Returns (steps, warmup steps)."""
    cfg = printed_config(stdout)
    peak, floor = cfg['learning_rate'], cfg['min_lr']
    fitted = re.search(r'^--max_minutes=[\d.]+: max_iters=(\d+) \(', stdout, re.M)
    n = int(fitted.group(1)) if fitted else cfg['max_iters']
    warmup = cfg['warmup_iters']
    cut = re.search(r'^warning: warmup_iters=(\d+) is more than half the LR decay \((\d+) steps\): '
                    r'warming up for (\d+) steps', stdout, re.M)
    if cut:
        assert int(cut.group(2)) == n, f"the decay does not end at the run's end ({n} steps): {cut.group(0)}"
        warmup = int(cut.group(3))
        assert warmup == n // 10
        # a budget's 10 calibration steps run under the uncut warmup; one cut below them never peaks
        assert not (fitted and warmup < 10), f"the budget fitted {n} steps: too few to check (warmup cut to {warmup})"
    assert warmup < n, f"warmup_iters={warmup} for a {n}-step run: it never leaves the warmup"
    assert n - warmup >= 20, (f"{n} steps, {warmup} of warmup: too few after it to check the decay's end "
                              f"(the budget or --max_iters is too short)")
    with open(out_dir / 'log.jsonl') as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if 'loss' in r and 'lr' in r]
    assert [r['iter'] for r in steps] == list(range(1, n + 1))
    lrs = [r['lr'] for r in steps]  # lrs[i]: the LR of the step from iter i to i + 1
    assert lrs[warmup] == pytest.approx(peak, rel=1e-9), f"the LR at the warmup's end (iter {warmup}) is not {peak}"
    assert max(lrs) <= peak * (1 + 1e-9)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1])), 'the LR does not rise through the warmup'
    # falling at every step to the last: the cosine ends at the run's end, not before (flat at
    # min_lr after an earlier lr_decay_iters) nor after (see the last step's LR below)
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:])), 'the LR does not fall at every step after the warmup'
    assert floor <= lrs[-1] <= floor + 0.01 * (peak - floor), (
        f"the last step's LR is {lrs[-1]:.3g}, {(lrs[-1] - floor) / (peak - floor):.1%} of the way from "
        f"min_lr={floor:g} to learning_rate={peak:g}: the cosine did not finish")
    last_eval = [r for r in rows if 'val_loss' in r][-1]
    assert last_eval['iter'] == n and last_eval['lr'] == pytest.approx(floor, rel=1e-9)
    assert math.isfinite(last_eval['val_loss'])
    return n, warmup


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot write into: chmod for a normal user; root writes through
    permissions, so for root a read-only tmpfs mount (skipped where mounting is not allowed)."""
    path = tmp_path / 'readonly'
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    yield path
    subprocess.run(['umount', str(path)], capture_output=True)


@pytest.fixture(scope='session')
def stories_dir():
    if not (STORIES / 'train.txt').is_file():
        pytest.fail(f"{STORIES} is missing: the tests read the real TinyStories sample from ../shared")
    return STORIES
