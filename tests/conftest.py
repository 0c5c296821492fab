"""Shared test setup: offline tokenizer files and the real TinyStories sample in ../shared."""
import os
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


@pytest.fixture(scope='session')
def stories_dir():
    if not (STORIES / 'train.txt').is_file():
        pytest.fail(f"{STORIES} is missing: the tests read the real TinyStories sample from ../shared")
    return STORIES
