"""
Draw a training run's loss curves: train and val loss against tokens seen, with the
learning rate on a second axis, from out_dir/log.jsonl (written by train.py at every
evaluation) to out_dir/loss_curve.png. train.py calls plot_log() when it finishes;
run it yourself to look at a run in progress:

    python plot.py --out_dir=out
"""
import json
import os

from common import atomic_write, check_writable, config_defaults, die, parse_config

out_dir = 'out'  # the run folder: reads log.jsonl, writes loss_curve.png


def read_log(path):
    """The rows of a log.jsonl: one dict per evaluation."""
    if not os.path.isfile(path):
        die(f"{path} not found: train.py writes it at every evaluation (pass --out_dir=FOLDER of a run)")
    rows = []
    with open(path, encoding='utf-8', errors='replace') as f:  # bad bytes fail as a bad row below
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row['tokens'], row['train_loss'], row['val_loss'], row['lr']  # the columns we draw
            except (ValueError, TypeError, KeyError) as e:
                die(f"{path} line {n} is not a train.py log row ({type(e).__name__}: {e})")
            rows.append(row)
    if not rows:
        die(f"{path} has no evaluations yet: wait for the first eval_interval")
    return rows


def plot_log(out_dir):
    """Write out_dir/loss_curve.png from out_dir/log.jsonl; returns the PNG's path."""
    from matplotlib.figure import Figure  # no pyplot: works without a display, changes no global state
    rows = read_log(os.path.join(out_dir, 'log.jsonl'))
    tokens = [r['tokens'] / 1e6 for r in rows]
    fig = Figure(figsize=(8, 5), layout='constrained')
    ax = fig.subplots()
    ax.plot(tokens, [r['train_loss'] for r in rows], 'o-', ms=3, label='train loss')
    ax.plot(tokens, [r['val_loss'] for r in rows], 'o-', ms=3, label='val loss')
    ax.set_xlabel('tokens seen (millions)')
    ax.set_ylabel('cross-entropy loss (nats/token)')
    ax.grid(alpha=0.3)
    best = min(rows, key=lambda r: r['val_loss'])
    ax.set_title(f"{os.path.basename(os.path.abspath(out_dir))}: best val loss {best['val_loss']:.4f} "
                 f"at iter {best['iter']}")
    lr_ax = ax.twinx()  # the schedule explains the curve's bends
    lr_ax.plot(tokens, [r['lr'] for r in rows], '--', color='gray', label='learning rate')
    lr_ax.set_ylabel('learning rate')
    lr_ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc='upper right')
    path = os.path.join(out_dir, 'loss_curve.png')
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120))
    return path


def check_config(cfg):
    """A place the PNG cannot be written stops here, with one line, before any drawing."""
    check_writable(cfg['out_dir'], '--out_dir')
    png = os.path.join(cfg['out_dir'], 'loss_curve.png')
    if os.path.isdir(png):
        die(f"{png} is a folder, so the plot cannot be written there: move it away or pick another --out_dir")


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, script=__file__)
    check_config(cfg)
    print(f"wrote {plot_log(cfg['out_dir'])}")


if __name__ == '__main__':
    main()
