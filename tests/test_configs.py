"""The configs users run, run as shipped with only their sizes shrunk: every file in config/ and
every recipe line of SLM.ipynb (its first cell picks one per hardware). Each run's log.jsonl
must show the LR schedule a user of that line gets: the LR rises to learning_rate at the end of
the warmup, never goes above it, and has decayed to min_lr by the last step, also when
--max_iters or --max_minutes shortens the run (config/tinystories.py once set
lr_decay_iters = 20000: the 300-step GPU check (docs/training.md) never left its warmup, and the
notebook's 60-minute T4 run, ~11,700 steps, would have ended at an LR near 2.3e-4, 4.6x min_lr).

The rule of tests/conftest.py holds: the flags (conftest.py's SHRINK, which test_notebook.py
shares) shrink sizes and step counts; the one shortcut, --report=False, is said where it is made."""
import pytest

from conftest import (REPO, SHRINK, assert_lr_schedule_ends_at_min_lr, notebook_recipes, prepare_stories,
                      run_script, shrink_flags, tiny_checkpoint)


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
    return tiny_checkpoint(tmp_path_factory.mktemp('source') / 'best_model_params.pt', block_size=32)


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_runs_and_its_lr_ends_at_min_lr(recipe, data_dir, source, tmp_path):
    out = tmp_path / 'out'
    flags = [f.format(source=source) for f in shrink_flags(recipe)]
    r = run_script('train.py', *recipe.split(), *flags, f'--data_dir={data_dir}', f'--out_dir={out}')
    assert r.returncode == 0, r.stderr
    n, _ = assert_lr_schedule_ends_at_min_lr(out, r.stdout)
    assert f'done: {n} iters' in r.stdout
