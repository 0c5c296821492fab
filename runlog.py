"""
The run log, out_dir/log.jsonl: train.py writes a row per optimizer step (its batch loss and LR)
and a row per evaluation (train/val loss estimates, speed); plot.py, eval.py, the export's model
card (hf.py) and a resuming train.py read it back. Here: its writer, its reader, and its plot
(loss_curve.png); and the same rows sent to Weights & Biases (--wandb_log).
"""
import json
import os

from common import atomic_write, die, die_if_disk_full

LOG_COLUMNS = ('iter', 'tokens', 'train_loss', 'val_loss', 'lr')  # an evaluation row has these
STEP_COLUMNS = ('iter', 'tokens', 'loss', 'lr')  # a step row


def read_log(path, columns=LOG_COLUMNS):
    """The rows of a train.py log.jsonl that have all of columns (the evaluations, by default),
    [] if there is none. A line that is not a whole row (one being appended right now, or a
    damaged one) is skipped, not fatal."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and all(k in row for k in columns):
                rows.append(row)
    return rows


def load_log(out_dir):
    """read_log of out_dir/log.jsonl for what needs its rows: none stops with the fix."""
    log_path = os.path.join(out_dir, 'log.jsonl')
    rows = read_log(log_path)
    if not rows:
        die(f"{log_path} holds no evaluations (missing, or none yet): train.py writes a row at every "
            f"eval_interval; pass --out_dir=FOLDER of a run")
    return rows


def start_log(out_dir, start_iter, init_from):
    """Start out_dir/log.jsonl (making out_dir): empty, or on a resume (init_from 'resume') its
    rows up to start_iter, the checkpoint's iter (the steps after it run again). Returns the wall
    time the kept rows had already taken."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # check_writable cannot foresee everything (e.g. a folder under /proc)
        die(f"cannot create out_dir {out_dir} ({e.strerror}): choose a writable --out_dir")
    log_path = os.path.join(out_dir, 'log.jsonl')
    rows = ([r for r in read_log(log_path, columns=('iter',)) if r['iter'] <= start_iter]  # evaluations and steps
            if init_from == 'resume' else [])
    atomic_write(log_path, lambda f: f.writelines(json.dumps(r) + '\n' for r in rows), mode='w')
    return next((r.get('elapsed_s', 0.0) for r in reversed(rows) if 'elapsed_s' in r), 0.0)


def append_log(out_dir, row):
    """One JSON row at the end of out_dir/log.jsonl: an evaluation's or a step's. A full disk
    stops with one line; the rows before stay (read_log skips a cut-off last line)."""
    path = os.path.join(out_dir, 'log.jsonl')
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(row) + '\n')
    except OSError as e:
        die_if_disk_full(e, path)
        raise


def loss_figure(out_dir):
    """The loss curves of out_dir/log.jsonl, against tokens seen: the batch loss of every step
    (faint) and its running mean, the val loss of each evaluation, and the learning rate of
    every step on a second axis. A matplotlib Figure."""
    from matplotlib.figure import Figure  # no pyplot: works without a display, changes no global state
    evals = load_log(out_dir)
    steps = read_log(os.path.join(out_dir, 'log.jsonl'), STEP_COLUMNS)
    fig = Figure(figsize=(9, 5.5), layout='constrained')
    ax = fig.subplots()
    if steps:
        x, loss = [r['tokens'] / 1e6 for r in steps], [r['loss'] for r in steps]
        window = max(1, len(steps) // 50)  # a fiftieth of the run: smooth enough, and it follows the bends
        cum = [0.0]
        for v in loss:
            cum.append(cum[-1] + v)
        mean = [(cum[i + 1] - cum[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(loss))]
        ax.plot(x, loss, color='C0', alpha=0.2, lw=0.7, label='train loss, each step')
        ax.plot(x, mean, color='C0', lw=1.8, label=f'train loss, mean of {window} steps')
        lr_x, lr = x, [r['lr'] for r in steps]
        shown = mean[len(mean) // 10:] or mean  # the y-range leaves out the first 10% of steps
    else:  # a log without step rows: the evaluations' train-loss estimates
        ax.plot([r['tokens'] / 1e6 for r in evals], [r['train_loss'] for r in evals], 'o-', ms=3, label='train loss')
        lr_x, lr = [r['tokens'] / 1e6 for r in evals], [r['lr'] for r in evals]
        shown = [r['train_loss'] for r in evals[len(evals) // 10:]] or [evals[0]['train_loss']]
    val_x, val = [r['tokens'] / 1e6 for r in evals], [r['val_loss'] for r in evals]
    ax.plot(val_x, val, 'o-', color='C1', ms=4, label='val loss, each evaluation')
    # the first minutes drop from ~10.9 (ln 50257): a y-range from there would flatten the rest
    later_val = [v for t, v in zip(val_x, val) if t >= val_x[-1] / 10] or val
    low, high = min(shown + later_val), max(shown + later_val)
    pad = max(0.05 * (high - low), 0.02)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel('tokens seen (millions)')
    ax.set_ylabel('cross-entropy loss (nats/token)')
    ax.grid(alpha=0.3)
    best = min(evals, key=lambda r: r['val_loss'])
    ax.set_title(f"{os.path.basename(os.path.abspath(out_dir))}: best val loss {best['val_loss']:.4f} "
                 f"at iter {best['iter']} (y-axis fitted to the last 90% of training)")
    lr_ax = ax.twinx()  # the schedule explains the curve's bends
    lr_ax.plot(lr_x, lr, '--', color='gray', lw=1, label='learning rate')
    lr_ax.set_ylabel('learning rate')
    lr_ax.set_ylim(0, max(lr) * 1.05 if max(lr) > 0 else 1)
    lr_ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc='upper right')
    return fig


def plot_log(out_dir):
    """Write out_dir/loss_curve.png (loss_figure). Returns its path."""
    fig = loss_figure(out_dir)
    path = os.path.join(out_dir, 'loss_curve.png')
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120))
    return path


# -----------------------------------------------------------------------------
# Weights & Biases: the same rows, sent to a W&B run

def log_row(out_dir, row, wandb_run=None):
    """One row, an evaluation's or a step's, to out_dir/log.jsonl and to the W&B run, if any."""
    append_log(out_dir, row)
    if wandb_run:
        wandb_run.log(wandb_row(row), step=row['iter'])


def check_wandb():
    """--wandb_log needs the wandb package, not a requirement: train.py asks before it trains."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        die("--wandb_log=True needs the wandb package, which is not installed: pip install wandb")


def start_wandb(cfg, run_id=None):
    """train.py's --wandb_log (rank 0): a new W&B run with the resolved config, or the W&B run
    run_id (a resumed checkpoint's) continued, its config updated (init_from and anything passed anew)."""
    import wandb
    try:
        return wandb.init(project=cfg['wandb_project'], name=cfg['wandb_run_name'] or None, config=cfg,
                          dir=cfg['out_dir'], id=run_id, resume='allow' if run_id else None,
                          allow_val_change=run_id is not None)
    except Exception as e:  # no API key without a terminal to ask for one, no network, ...
        die(f"W&B could not start a run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
            f"run `wandb login` (or set WANDB_API_KEY), or WANDB_MODE=offline to log locally")


def wandb_row(row):
    """A log.jsonl row under W&B names: an evaluation's as nanoGPT logs them (train/loss,
    val/loss, lr, mfu, ...), a step's batch loss and LR under step/ (the evaluation at the same
    iter reports the next step's LR under lr)."""
    if 'loss' in row:  # a step's row
        return {'iter': row['iter'], 'tokens': row['tokens'], 'step/loss': row['loss'], 'step/lr': row['lr']}
    names = {'train_loss': 'train/loss', 'val_loss': 'val/loss'}
    return {names.get(k, k): v for k, v in row.items()}
