"""Shared test setup: offline tokenizer files and the real TinyStories sample in ../shared.

The rule for this suite: a fixture (or a config such as config/tiny.py) may shrink sizes
and step counts, but it must never switch off code that the default run executes. Where
a shortcut is needed for speed, another test covers the default path, and the shortcut
says which. (config/tiny.py once set peak_flops, which skipped the start-up matmul
measurement, and so hid that it broke exact resume.)
"""
import os
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
    """The one-line message a user sees when fn stops the script."""
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def script_env():
    # one thread: a tiny model runs faster and steadier on a shared CPU than with two
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def prepare_stories(out, train_file, val_file):
    """prepare.py as a user runs it, on local story files, into out; returns out."""
    r = subprocess.run([sys.executable, 'prepare.py', f'--train_files={train_file}', f'--val_files={val_file}',
                        f'--out_dir={out}'], cwd=REPO, capture_output=True, text=True, env=script_env(),
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return out


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
