"""data.py: the .bin files on disk checked against meta.json, and the tokenizer's download."""
import os
import socket
import time

import numpy as np

import common
from conftest import error_of, one_line_error, run_script
from data import open_split


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


def test_a_tokenizer_download_that_never_answers_fails_in_one_line(tmp_path):
    # a "proxy" that accepts connections and never answers: the BPE download would hang forever
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen()
    port = silent.getsockname()[1]
    env = {k: None for k in os.environ if 'proxy' in k.lower()}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty-cache'), HTTPS_PROXY=f'http://127.0.0.1:{port}',
               HTTP_PROXY=f'http://127.0.0.1:{port}')
    t0 = time.time()
    with silent:
        r = run_script('-c', 'import data; data.get_tokenizer(timeout=2)', env=env, timeout=60)
    assert time.time() - t0 < 30
    err = one_line_error(r)
    assert 'no answer in 2 s' in err and 'TIKTOKEN_CACHE_DIR' in err
