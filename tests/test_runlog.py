"""runlog.py: log.jsonl read back while it is written, and the loss curve drawn from it."""
import json
import math

import numpy as np
import torch

import runlog


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
