"""common.py: config flags and their errors, --help, atomic files; and, across the repository,
the one-way flow of imports between the scripts and the shared modules."""
import ast
import importlib
import importlib.metadata
import json
import os
import re

import pytest

import common
from conftest import REPO, error_of

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


RULED = """
batch_size = 32    # sequences per micro-batch; in [1, inf)
dropout = 0.1      # on the residual stream; in [0, 1)
top_p = 1.0        # nucleus; in (0, 1]
seed = 1337        # the seed; in [0, 2**63)
top_k = 200        # 0 or None = all tokens; in [0, inf)
backend = 'auto'   # DDP backend; in {auto, nccl, gloo}
note = 'x'         # a plain comment in (brackets) stays a comment
"""


def test_a_rule_at_the_end_of_a_comment_is_enforced_and_printed(tmp_path, capsys):
    """The range or choice that ends a default's comment: [ ] include the ends, ( ) leave them out."""
    script = tmp_path / 'script.py'
    script.write_text(RULED)
    defaults = common.config_defaults(dict(runpy_globals(script)))

    def parse(*argv):
        return common.parse_config(defaults, list(argv), nullable=('top_k',), script=str(script))

    ok = parse('--batch_size=1', '--dropout=0', '--top_p=1', '--seed=9223372036854775807', '--top_k=0',
               '--top_k=None', '--backend=gloo', '--note=anything')
    assert (ok['batch_size'], ok['top_p'], ok['top_k'], ok['backend']) == (1, 1.0, None, 'gloo')
    for flag, message in [('--batch_size=0', '--batch_size=0 must be in [1, inf): sequences per micro-batch'),
                          ('--dropout=1', '--dropout=1.0 must be in [0, 1): on the residual stream'),
                          ('--dropout=-0.0001', 'must be in [0, 1)'),
                          ('--top_p=0', '--top_p=0.0 must be in (0, 1]'),
                          ('--seed=9223372036854775808', 'must be in [0, 2**63)'),
                          ('--backend=mpi', "--backend='mpi' must be in {auto, nccl, gloo}: DDP backend")]:
        assert message in error_of(parse, flag), flag
    with pytest.raises(SystemExit):  # nan is in no range (a config file can make one)
        common.check_rules({'dropout': float('nan')}, {'dropout': 'on the residual stream; in [0, 1)'})
    with pytest.raises(SystemExit):
        parse('--help')
    assert 'sequences per micro-batch; in [1, inf)' in capsys.readouterr().out


def runpy_globals(path):
    namespace = {}
    exec(compile(path.read_text(), str(path), 'exec'), namespace)
    return namespace


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


def calls_parse_config(path):
    """Whether the file calls parse_config (defining it, as common.py does, is not calling it)."""
    return any(isinstance(node, ast.Call) and 'parse_config' in (getattr(node.func, 'id', None),
                                                                 getattr(node.func, 'attr', None))
               for node in ast.walk(ast.parse(path.read_text())))


# the scripts: the files at the repository root that read flags (config files and --key=value)
SCRIPTS = sorted(p.stem for p in REPO.glob('*.py') if calls_parse_config(p))


@pytest.mark.parametrize('script', SCRIPTS)
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


def imported_modules(name):
    """Every module a file imports, at the top or inside a function."""
    tree = ast.parse((REPO / f'{name}.py').read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split('.')[0])
    return found


def test_no_module_of_ours_shadows_an_installed_package():
    """The repo root comes first on sys.path, so a module named like an installed package hides it
    from every library that imports it (a kernels.py would hide Hugging Face's `kernels`, which
    transformers 5.x requires and imports)."""
    ours = {p.stem for p in REPO.glob('*.py')}
    installed = set(importlib.metadata.packages_distributions())
    assert not ours & installed, f"rename {sorted(ours & installed)}: an installed package has that name"


def test_imports_flow_one_way():
    """Scripts import the shared modules (every other .py beside them: common, model, lean_kernels,
    engine, ...), never each other (bench.py alone times train.py's step and prepare.py's pipeline,
    and says so); a shared module imports no script, and the shared ones import each other
    without cycles (model.py imports lean_kernels and engine, which know nothing of model.py)."""
    assert {'prepare', 'train', 'sample', 'eval', 'export', 'plot', 'bench', 'serve'} <= set(SCRIPTS)
    shared = sorted(p.stem for p in REPO.glob('*.py') if p.stem not in SCRIPTS)
    assert {'common', 'device', 'data', 'checkpoints', 'hf', 'runlog', 'model', 'lean_kernels', 'engine'} <= set(shared)
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
    assert 'model' not in uses['engine'] | uses['lean_kernels']
    for name in SCRIPTS:
        allowed = {'train', 'prepare'} if name == 'bench' else set()
        assert imported_modules(name) & set(SCRIPTS) <= allowed, name
