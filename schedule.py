"""
How long train.py runs and at what learning rate: the LR schedule (linear warmup, then a cosine
or warmup-stable-decay to min_lr), the warmup of a run too short for it, and --max_minutes, which times the first steps
of a run and then sets max_iters so that the whole run ends on time.
"""
import math
import statistics
import time

import torch
import torch.distributed as dist

from engine import generate

CALIBRATION_STEPS = 10  # --max_minutes: steps timed before max_iters is fixed (the first one is not counted)


def get_lr(it, cfg):
    """Learning rate at optimizer step it: linear warmup, then a decay to min_lr at decay_end (cosine,
    or wsd: the peak held until the last decay_fraction of the steps, then a straight line), then flat."""
    lr, min_lr = cfg['learning_rate'], cfg['min_lr']
    if not cfg['decay_lr']:
        return lr
    warmup, decay_end = cfg['warmup_iters'], cfg['lr_decay_iters'] or cfg['max_iters']
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_end:
        return min_lr
    if cfg['lr_schedule'] == 'wsd':
        decay_start = max(warmup, decay_end - round(cfg['decay_fraction'] * decay_end))
        return lr - (lr - min_lr) * max(0, it - decay_start) / (decay_end - decay_start)
    progress = (it - warmup) / (decay_end - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def cut_warmup(cfg):
    """A run shorter than its warmup (a quick `--max_iters=100` under the recipe's 1000 steps)
    warms up for a tenth of the decay instead, as does one whose warmup would take more than half of
    it (a --max_minutes budget that fits few steps): at least half of a run decays. Returns the
    warning line, or None."""
    decay_end = cfg['lr_decay_iters'] or cfg['max_iters']
    if not (cfg['decay_lr'] and cfg['warmup_iters'] > decay_end / 2):
        return None
    warmup = decay_end // 10
    warning = (f"warning: warmup_iters={cfg['warmup_iters']} is more than half the LR decay "
               f"({decay_end} steps): warming up for {warmup} steps instead (a tenth)")
    cfg['warmup_iters'] = warmup
    return warning


def decode_seconds(run):
    """Seconds per token of batch-1 decoding with the KV cache, as the report's stories run,
    from 16 timed tokens; drawn outside the run's random streams so they stay as they were."""
    with torch.random.fork_rng(), run.ctx:
        run.model.eval()
        idx = torch.zeros((1, 1), dtype=torch.long, device=run.device)
        generate(run.model, idx, 2)  # first-call allocations
        t0 = time.time()
        generate(run.model, idx, 16)
        seconds = (time.time() - t0) / 16
        run.model.train()
    return seconds


def fit_to_budget(cfg, run, it, step_times, eval_costs):
    """--max_minutes, after CALIBRATION_STEPS steps: the max_iters at which the steps left, their evaluations
    + checkpoints and the report card end max_minutes after train.py started, from costs timed in this run:
    a step (step_times), an evaluation with its checkpoint (eval_costs: iter 0's seconds, all and the loss
    estimate's), the report's full pass (val.bin at the evaluation's tokens/s) and its stories (a timed
    decoding step). Rank 0 decides; every rank gets the same max_iters, and the warmup is cut to fit."""
    step_s = statistics.median(step_times[1:])  # not the first (allocations); one slowed by a neighbour does not count
    max_iters = cfg['max_iters']
    if run.master:
        eval_tokens = 2 * cfg['eval_iters'] * cfg['batch_size'] * cfg['block_size']
        if eval_costs is None:  # resumed before the budget was fitted: no iter-0 evaluation in this process
            eval_costs = (step_s * eval_tokens / (run.tokens_per_iter / run.world_size),) * 2
        eval_s, loss_s = eval_costs
        report_s = 0.0
        if cfg['report']:
            # eval.py --report: ~3 s to start (Python, torch, the checkpoint), a full pass over val.bin,
            # then 10 stories of up to 200 tokens (its defaults)
            report_s = 3.0 + len(run.splits['val']) * loss_s / eval_tokens + 10 * 200 * decode_seconds(run)
        left = cfg['max_minutes'] * 60 - (time.time() - run.t0) - 1.0  # 1 s: the loss curve at the end
        steps = (left - report_s - eval_s) / (step_s + eval_s / cfg['eval_interval'])
        max_iters = it + max(1, int(steps))
        print(f"--max_minutes={cfg['max_minutes']:g}: max_iters={max_iters} ({step_s * 1000:.0f} ms per step, "
              f"{eval_s:.1f} s per evaluation + checkpoint every {cfg['eval_interval']} steps, "
              f"~{report_s:.0f} s for the report; {left / 60:.1f} of {cfg['max_minutes']:g} min left)", flush=True)
    if run.ddp:
        box = [max_iters]
        dist.broadcast_object_list(box, src=0)
        max_iters = box[0]
    cfg['max_iters'], run.budget_fixed = max_iters, True
    warning = cut_warmup(cfg)
    if warning and run.master:
        print(warning)
    if run.wandb:
        run.wandb.config.update({k: cfg[k] for k in ('max_iters', 'warmup_iters')}, allow_val_change=True)
