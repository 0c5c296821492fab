"""A full disk is one clear line, not a traceback: every script that writes (prepare's bins,
train's checkpoints, log.jsonl and loss_curve.png, eval --report, export, bench --json) stops
with `error: cannot write FILE: CAUSE: FIX`, exit code 1, keeps what was there before and
leaves no temp file. The disk fills mid-write as a user's would: each script runs as a user
runs it, under a file-size limit (RLIMIT_FSIZE, `ulimit -f`), past which a write fails with
EFBIG ("file too large") as a full disk fails it with ENOSPC; both end in one place,
common.die_if_disk_full."""
import glob
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import one_line_error, run_script


def run(script, *args, limit=None):
    """script as a user runs it (run_script); with limit, no file may grow past limit bytes (its
    writes fail with EFBIG there, as on a full disk)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return run_script(script, *args, preexec_fn=cap if limit else None)


def snapshot(folder):
    """Every file under folder, name -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def assert_stops_cleanly(r, path, folder):
    """Exit code 1, stderr one line naming path and the cause, no traceback, no temp file in folder."""
    line = one_line_error(r)
    assert f"cannot write {path}: " in line, line
    assert 'file too large' in line or 'no space' in line, line
    assert not glob.glob(os.path.join(folder, '**', '*.tmp*'), recursive=True)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, stories_dir):
    """sample5.txt (a few stories) prepared: enough tokens for config/tiny.py's windows."""
    out = tmp_path_factory.mktemp('data') / 'tiny'
    sample = stories_dir / 'sample5.txt'
    r = run('prepare.py', f'--train_files={sample}', f'--val_files={sample}', f'--out_dir={out}', '--num_proc=1')
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    """config/tiny.py's 8 steps: ckpt.pt, best_model_params.pt, log.jsonl and loss_curve.png."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    r = run('train.py', 'config/tiny.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--report=False')
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run to fill up (mtimes kept: loss_curve.png stays newer than the log)."""
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    return out


def resume(out, data_dir, max_iters, limit):
    """train.py --init_from=resume of the run in out, to max_iters, under the file-size limit."""
    return run('train.py', 'config/tiny.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--init_from=resume',
               f'--max_iters={max_iters}', '--report=False', limit=limit)


def test_prepare_keeps_the_earlier_data(data_dir, stories_dir, tmp_path):
    out = tmp_path / 'data'
    shutil.copytree(data_dir, out)
    before = snapshot(out)
    # validation.txt's train.bin (~120 kB) does not fit under 20 kB
    r = run('prepare.py', f"--train_files={stories_dir / 'validation.txt'}", f"--val_files={stories_dir / 'sample5.txt'}",
            f'--out_dir={out}', '--force', '--num_proc=1', limit=20_000)
    assert_stops_cleanly(r, out / 'train.bin', tmp_path)
    assert snapshot(out) == before


def test_train_checkpoint_keeps_the_earlier_one(run_copy, data_dir):
    ckpt = run_copy / 'ckpt.pt'
    before = ckpt.read_bytes()
    # room for log.jsonl and best_model_params.pt (weights only), not for ckpt.pt (weights + Adam state)
    limit = (os.path.getsize(run_copy / 'best_model_params.pt') + len(before)) // 2
    r = resume(run_copy, data_dir, 12, limit)
    assert_stops_cleanly(r, ckpt, run_copy)
    assert ckpt.read_bytes() == before
    assert torch.load(ckpt, weights_only=True)['iter_num'] == 8
    torch.load(run_copy / 'best_model_params.pt', weights_only=True)  # the old one, or the new one whole


def test_train_log_append_keeps_the_rows_before(run_copy, data_dir):
    log = run_copy / 'log.jsonl'
    before, ckpt = log.read_bytes(), (run_copy / 'ckpt.pt').read_bytes()
    # the resume rewrites the same rows (they fit exactly), then the first step's row does not fit
    r = resume(run_copy, data_dir, 12, len(before))
    assert_stops_cleanly(r, log, run_copy)
    assert 'resuming from' in r.stdout and 'iter 9/12' not in r.stdout  # it stopped at iter 9's row
    assert log.read_bytes() == before and (run_copy / 'ckpt.pt').read_bytes() == ckpt


def test_train_loss_curve_keeps_the_earlier_plot(run_copy, data_dir):
    png = run_copy / 'loss_curve.png'
    before = png.read_bytes()
    # resumed at its end: no step, no checkpoint; log.jsonl is rewritten (it fits), then the plot is drawn
    r = resume(run_copy, data_dir, 8, os.path.getsize(run_copy / 'log.jsonl'))
    assert_stops_cleanly(r, png, run_copy)
    assert png.read_bytes() == before


def test_eval_report_keeps_the_earlier_report(run_copy):
    report = run_copy / 'report.md'
    report.write_text('an earlier report\n')
    before = snapshot(run_copy)
    r = run('eval.py', '--report', f'--out_dir={run_copy}', '--num_samples=1', '--max_new_tokens=4',
            '--device=cpu', limit=200)
    assert_stops_cleanly(r, report, run_copy)
    assert snapshot(run_copy) == before


def test_export_keeps_the_earlier_export(trained, tmp_path):
    out = tmp_path / 'hf'
    out.mkdir()
    (out / 'config.json').write_text('{"an": "earlier export"}\n')
    # model.safetensors (~6 MB) is the first file written and does not fit under 500 kB
    r = run('export.py', f"--ckpt={trained / 'best_model_params.pt'}", f'--out={out}', '--force', limit=500_000)
    assert_stops_cleanly(r, out / 'model.safetensors', tmp_path)
    assert os.listdir(tmp_path) == ['hf'] and snapshot(out) == {'config.json': b'{"an": "earlier export"}\n'}


def test_bench_json_keeps_the_earlier_figures(tmp_path):
    out = tmp_path / 'bench.json'
    out.write_text('{"earlier": "figures"}\n')
    r = run('bench.py', '--what=peak', '--gemm_size=128', '--copy_mb=4', '--repeats=1', '--threads=1',
            f'--json={out}', limit=100)
    assert_stops_cleanly(r, out, tmp_path)
    assert out.read_text() == '{"earlier": "figures"}\n'


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB disk (a tmpfs; mounting needs root, skipped elsewhere): writes past it fail with
    ENOSPC, a full disk for real."""
    path = tmp_path / 'disk'
    path.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield path
    subprocess.run(['umount', str(path)], capture_output=True)


def test_a_really_full_disk_says_no_space(trained, small_disk):
    out = small_disk / 'hf'
    out.mkdir()
    (out / 'config.json').write_text('{"an": "earlier export"}\n')
    r = run('export.py', f"--ckpt={trained / 'best_model_params.pt'}", f'--out={out}', '--force')
    assert_stops_cleanly(r, out / 'model.safetensors', small_disk)
    assert 'no space left on device' in r.stderr  # safetensors' "(os error 28)", read through
    assert os.listdir(small_disk) == ['hf'] and snapshot(out) == {'config.json': b'{"an": "earlier export"}\n'}
