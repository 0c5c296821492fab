"""The configs users run, run as shipped with only their sizes shrunk: every file in config/ and
every recipe line of SLM.ipynb (its first cell picks one per hardware). Each run's log.jsonl
must show the LR schedule a user of that line gets: the LR rises to learning_rate at the end of
the warmup, never goes above it, and has decayed to min_lr by the last step, also when
--max_iters or --max_minutes shortens the run (config/tinystories.py once set
lr_decay_iters = 20000: the 300-step GPU check (docs/training.md) never left its warmup, and the
notebook's 60-minute T4 run, ~11,700 steps, would have ended at an LR near 2.3e-4, 4.6x min_lr).

The rule of tests/conftest.py holds: the flags below shrink sizes and step counts; the one
shortcut, --report=False, is said where it is made."""
import ast
import json
import math
import re
import subprocess
import sys

import nbformat
import pytest

from conftest import REPO, prepare_stories, script_env

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

# config file -> the flags that shrink its run. test_every_config_file_has_an_entry fails for a
# file in config/ without one. Step counts are sized for the check below: the last step's LR is
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
    cut = re.search(r'^warning: warmup_iters=(\d+) is longer than the LR decay \((\d+) steps\): '
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


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, stories_dir):
    return prepare_stories(tmp_path_factory.mktemp('data') / 'tinystories', stories_dir / 'train.txt',
                           stories_dir / 'validation.txt')


def config_files():
    return sorted(f'config/{p.name}' for p in (REPO / 'config').glob('*.py'))


def shrunk_run(recipe):
    """What train.py runs for a recipe line once shrunk: its config file and the last value of
    each flag."""
    config, *own = recipe.split()
    return config, tuple(sorted(dict(f.split('=', 1) for f in own + shrink_flags(recipe)).items()))


# every config file, then the notebook's recipe lines that shrink to another run: its CPU line
# is config/tinystories_cpu.py itself, and its bf16 line, in float32 on the CPU, is the
# config/tinystories.py run (one run covers both); its T4 line is a time budget
RECIPES, _runs = [], set()
for _recipe in config_files() + notebook_recipes():
    _run = shrunk_run(_recipe)
    if _run not in _runs:
        RECIPES.append(_recipe)
        _runs.add(_run)


def test_every_config_file_has_an_entry():
    assert sorted(SHRINK) == config_files(), 'a config file without SHRINK flags (or an entry without its file)'
    assert set(r.split()[0] for r in notebook_recipes()) <= set(SHRINK)


def test_the_gpu_recipe_spells_out_train_defaults():
    """config/tinystories.py says its values equal train.py's defaults: they do, and it sets no
    key a default run leaves alone (lr_decay_iters among them: the decay ends at max_iters)."""
    import train
    from common import config_defaults
    defaults, ns = config_defaults(vars(train)), {}
    exec(compile((REPO / 'config/tinystories.py').read_text(), 'config/tinystories.py', 'exec'), ns)
    recipe = config_defaults(ns)
    assert {k: (v, defaults[k]) for k, v in recipe.items() if v != defaults[k]} == {}
    assert 'lr_decay_iters' not in recipe


def test_the_tiny_config_sets_sizes_only():
    """config/tiny.py, the tests' config, sets no schedule key: the tests that train with it
    run train.py's schedule, the one users get."""
    ns = {}
    exec(compile((REPO / 'config/tiny.py').read_text(), 'config/tiny.py', 'exec'), ns)
    schedule = {'learning_rate', 'min_lr', 'warmup_iters', 'lr_decay_iters', 'decay_lr', 'max_minutes'}
    assert sorted(schedule & set(ns)) == []


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """A tiny SLM checkpoint of SIZES' shape: a fine-tuning recipe's source model."""
    import torch
    from dataclasses import asdict
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    path = tmp_path_factory.mktemp('source') / 'best_model_params.pt'
    torch.save({'model': GPT(config, verbose=False).state_dict(), 'model_args': asdict(config)}, path)
    return path


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_runs_and_its_lr_ends_at_min_lr(recipe, data_dir, source, tmp_path):
    out = tmp_path / 'out'
    flags = [f.format(source=source) for f in shrink_flags(recipe)]
    cmd = [sys.executable, 'train.py', *recipe.split(), *flags, f'--data_dir={data_dir}', f'--out_dir={out}']
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=script_env(), timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    n, _ = assert_lr_schedule_ends_at_min_lr(out, r.stdout)
    assert f'done: {n} iters' in r.stdout
