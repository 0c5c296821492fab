"""
Train SLM on the tokenized TinyStories in data_dir (made by prepare.py).

    python train.py                                  # the seed recipe (see config/tinystories.py)
    python train.py config/tinystories.py --batch_size=32
    python train.py config/tinystories_cpu.py        # 15 minutes on any CPU (a time budget)
    python train.py --init_from=resume               # continue the run in out_dir exactly
    python train.py config/finetune_tinystories.py   # fine-tune GPT-2 (or --init_from=PATH: any checkpoint)
    torchrun --nproc_per_node=2 train.py             # data parallel: NCCL on GPUs, gloo on CPU

Every eval_interval steps: train/val loss (to stdout and out_dir/log.jsonl), the best
weights so far (out_dir/best_model_params.pt) and everything needed to resume
(out_dir/ckpt.pt). Ctrl-C or SIGTERM saves ckpt.pt after the current step, then exits
with 130/143; `--init_from=resume` continues the same run (same losses as if never stopped).
"""
import time

STARTED = time.time()  # --max_minutes counts from here: the imports below (torch: ~2 s) are part of the run

import math
import os
import signal
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import MODEL_KEYS, check_init_from, finetune_source, load_weights, read_checkpoint
from common import check_writable, config_defaults, die, parse_config, torch_save
from data import get_batch, open_splits, vocab_size_of
from device import autocast, format_eta, matmul_flops, peak_memory, pick_device, pick_dtype, start_processes
from model import GPT, GPTConfig
from runlog import check_wandb, log_row, plot_log, start_log, start_wandb
from schedule import CALIBRATION_STEPS, cut_warmup, fit_to_budget, get_lr

# -----------------------------------------------------------------------------
# default config: the seed recipe (a 6-layer, 6-head, 384-wide GPT on TinyStories)
# I/O
out_dir = 'out'                  # checkpoints, log.jsonl, loss_curve.png and report.md go here
data_dir = 'data/tinystories'    # train.bin, val.bin and meta.json from prepare.py
eval_interval = 500              # optimizer steps between evaluations + checkpoints; in [1, inf)
log_interval = 10                # optimizer steps between progress lines; in [1, inf)
eval_iters = 200                 # batches per split in each evaluation; in [1, inf)
eval_only = False                # evaluate once and exit
always_save_checkpoint = True    # ckpt.pt at every eval (False: only when val loss improves)
init_from = 'scratch'            # 'scratch', 'resume' (out_dir/ckpt.pt), or fine-tune from: a checkpoint file
                                 # (SLM's or nanoGPT's), a Hugging Face GPT-2 folder, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl
seed = 1337                      # dropout and data windows (rank r uses seed + r); in [0, 2**63)
# data
gradient_accumulation_steps = 8  # micro-batches per optimizer step, summed over all processes; in [1, inf)
batch_size = 32                  # sequences per micro-batch; in [1, inf)
block_size = 128                 # tokens per sequence; in [1, inf)
# model
n_layer = 6                      # transformer blocks; in [1, inf)
n_head = 6                       # attention heads per block (must divide n_embd); in [1, inf)
n_embd = 384                     # width of the residual stream; in [1, inf)
dropout = 0.1                    # on embeddings, attention and residual outputs while training; in [0, 1)
bias = True                      # biases in Linear and LayerNorm layers, as GPT-2
# optimizer
optimizer = 'adamw'              # or muon: Muon for the 2-D weights in the blocks, AdamW for the rest; in {adamw, muon}
learning_rate = 5e-4             # AdamW's peak LR after warmup; in [0, inf)
max_iters = 20000                # optimizer steps (32 x 128 x 8 = 32,768 tokens each: 655M in all); in [1, inf)
max_minutes = 0.0                # > 0: set max_iters from timed steps so the whole run ends in this many minutes; in [0, inf)
weight_decay = 0.1               # AdamW decay on matrices and embeddings (not biases, norms); in [0, inf)
beta1 = 0.9                      # AdamW's moving-average factor for the gradient; in [0, 1)
beta2 = 0.95                     # ... and for the squared gradient; in [0, 1)
grad_clip = 0.5                  # clip the global gradient norm to this (0: off); in [0, inf)
muon_lr = 0.02                   # Muon's peak LR (the schedule scales it as it scales learning_rate); in [0, inf)
muon_momentum = 0.95             # Muon's momentum (Nesterov); in [0, 1)
muon_weight_decay = 0.0          # Muon's decoupled weight decay; in [0, inf)
# LR schedule: linear warmup, then a decay to min_lr, one step per optimizer step
decay_lr = True                  # False: a flat learning_rate, no warmup or decay
lr_schedule = 'cosine'           # cosine: decay all the way; wsd: hold the peak, then decay linearly; in {cosine, wsd}
decay_fraction = 0.2             # wsd: the last fraction of the steps that decays; in (0, 1]
warmup_iters = 1000              # steps of linear warmup (a tenth of a run less than twice as long); in [0, inf)
lr_decay_iters = 0               # step where the decay reaches min_lr; 0: max_iters; in [0, inf)
min_lr = 5e-5                    # the LR at the end of the cosine decay
# system
device = 'auto'                  # auto: cuda, else mps, else cpu; or cpu, cuda, cuda:1, mps
dtype = 'auto'                   # auto: bfloat16 on GPUs that have it, else float16; float32 on CPU
compile = False                  # torch.compile the model (faster on GPUs, slow to start)
backend = 'auto'                 # DDP backend; auto: nccl on CUDA, gloo otherwise; in {auto, nccl, gloo}
peak_flops = 0.0                 # device peak FLOP/s for MFU; 0: measure a dense matmul at startup; in [0, inf)
report = True                    # at the end, write out_dir/report.md (eval.py's report card)
# Weights & Biases, as nanoGPT spells it (pip install wandb; W&B's files go to out_dir/wandb)
wandb_log = False                # also send log.jsonl's rows and the resolved config to a W&B run (rank 0)
wandb_project = 'slm'            # the W&B project
wandb_run_name = ''              # the W&B run's name ('': W&B picks one)
# -----------------------------------------------------------------------------


def train_step(model, optimizer, scaler, batches, lr, grad_clip, ctx):
    """One optimizer step: forward + backward per micro-batch (gradient accumulation), then clip and
    AdamW. Returns the mean loss as a tensor (reading it syncs the GPU); the gradients stay in .grad."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_ratio', 1.0)  # Muon's groups: muon_lr / learning_rate
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        if isinstance(model, DDP):
            # all-reduce gradients only once, in the backward of the last micro-batch
            model.require_backward_grad_sync = micro == len(batches) - 1
        with ctx:
            _, loss = model(x, y)
        scaler.scale(loss / len(batches)).backward()
        loss_sum += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
    scaler.update()
    return loss_sum / len(batches)


@torch.no_grad()
def estimate_loss(model, splits, cfg, ctx, device):
    """Mean loss over eval_iters batches per split, the same windows every time (their own fixed-seed
    generator): the training data stream, and so resume, does not depend on how often we evaluate."""
    model.eval()
    out = {}
    for split, data in splits.items():
        gen = torch.Generator().manual_seed(cfg['seed'])
        losses = torch.zeros(cfg['eval_iters'])
        for k in range(cfg['eval_iters']):
            x, y = get_batch(data, cfg['batch_size'], cfg['block_size'], gen, device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def check_config(cfg):
    """What the rules beside the defaults cannot say: stop now, say why. Returns the warnings (a short warmup)."""
    if cfg['n_embd'] % cfg['n_head'] and cfg['init_from'] == 'scratch':  # else the shape is the checkpoint's
        die(f"n_embd={cfg['n_embd']} must be divisible by n_head={cfg['n_head']}")
    check_init_from(cfg['init_from'], cfg['out_dir'])
    if not 0 <= cfg['min_lr'] <= cfg['learning_rate']:
        die(f"min_lr={cfg['min_lr']} must be between 0 and learning_rate={cfg['learning_rate']} "
            f"(the cosine schedule decays from learning_rate down to min_lr)")
    check_writable(cfg['out_dir'], '--out_dir')  # before minutes of training, not at the first save
    if cfg['wandb_log']:
        check_wandb()
    if cfg['max_minutes'] and not cfg['eval_only']:
        return []  # max_iters is not known yet: fit_to_budget cuts the warmup if needed
    return [w for w in [cut_warmup(cfg)] if w]


# -----------------------------------------------------------------------------
# the phases of a run, in the order main() calls them

def setup(cfg):
    """Processes (torchrun: one per device), device, precision, seeds: the run's facts (main() adds the rest)."""
    rank, local_rank, world_size, device = start_processes(pick_device(cfg['device']), cfg['backend'])
    ddp = dist.is_initialized()  # under torchrun, even with one process
    accum = cfg['gradient_accumulation_steps']
    if accum % world_size:
        die(f"gradient_accumulation_steps={accum} must be divisible by the number of processes "
            f"({world_size}): pass --gradient_accumulation_steps={world_size * max(1, round(accum / world_size))}")
    device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
    dtype = pick_dtype(cfg['dtype'], device)
    torch.manual_seed(cfg['seed'] + rank)  # dropout; rank 0 of DDP matches a single-process run
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return SimpleNamespace(t0=STARTED, budget_fixed=False,  # --max_minutes counts from t0; max_iters not fitted yet
                           stop_signal=0,  # the Ctrl-C / SIGTERM received (request_stop), 0: none
                           wandb=None, wandb_id=None,  # the W&B run (rank 0, --wandb_log) and its id, kept in ckpt.pt
                           started_from=None,  # a fine-tune's source (--init_from), kept in its checkpoints
                           ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0,
                           device=device, device_type=device_type, dtype=dtype, ctx=autocast(device, dtype),
                           accum=accum // world_size,  # each process does its share of the micro-batches
                           tokens_per_iter=accum * cfg['batch_size'] * cfg['block_size'],
                           data_gen=torch.Generator().manual_seed(cfg['seed'] + rank))  # training windows, per rank


def read_resume_checkpoint(cfg, run, log):
    """On resume: out_dir/ckpt.pt, whose model shape wins over the config's (cfg is updated), as
    does the max_iters that --max_minutes fitted, so the schedule and the end stay the same."""
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = read_checkpoint(ckpt_path)
    if 'optimizer' not in ckpt:
        die(f"{ckpt_path} has no optimizer state: resume needs a ckpt.pt written by train.py")
    changed = [k for k in MODEL_KEYS if ckpt['model_args'].get(k) != cfg[k]]
    if changed:
        log(f"resume: model shape from the checkpoint, ignoring {', '.join(f'{k}={cfg[k]}' for k in changed)}")
    cfg.update({k: ckpt['model_args'][k] for k in MODEL_KEYS})
    run.wandb_id = ckpt.get('wandb_run_id')  # continue that W&B run, so the curves join
    run.started_from = ckpt.get('started_from')  # a fine-tune's source
    if cfg['max_minutes'] and ckpt.get('budget_fixed'):
        cfg.update({k: ckpt['config'][k] for k in ('max_iters', 'warmup_iters')})
        run.budget_fixed = True
        log(f"resume: max_iters={cfg['max_iters']}, as --max_minutes fitted it in the first run")
    return ckpt


def build_model(cfg, run, ckpt, log):
    """run.model, run.optimizer (AdamW), run.scaler (fp16's): fresh, or as the checkpoint left them, and on
    resume every random stream, so the run continues exactly: nothing may draw from the restored streams
    before training does (see device.matmul_flops). Returns (start iter, best val loss)."""
    run.model = GPT(GPTConfig(**run.model_args), verbose=run.master)
    if ckpt is not None:
        source = os.path.join(cfg['out_dir'], 'ckpt.pt') if cfg['init_from'] == 'resume' else cfg['init_from']
        load_weights(run.model, ckpt['model'], source)  # also takes _orig_mod./module. keys
    run.model.to(run.device)
    muon = dict(lr=cfg['muon_lr'], momentum=cfg['muon_momentum'], weight_decay=cfg['muon_weight_decay'])
    run.optimizer = run.model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                                   (cfg['beta1'], cfg['beta2']), run.device_type,
                                                   muon if cfg['optimizer'] == 'muon' else None)
    run.scaler = torch.amp.GradScaler(run.device_type, enabled=(run.dtype == 'float16'))
    if cfg['init_from'] != 'resume':  # a fine-tune starts a new run: step 0, fresh AdamW state
        return 0, float('inf')
    run.optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        run.scaler.load_state_dict(ckpt['scaler'])
    rng, rank = ckpt['rng'], run.rank
    if len(rng) == run.world_size:  # same process count: each rank continues its own streams
        torch.set_rng_state(rng[rank]['torch'])
        run.data_gen.set_state(rng[rank]['data'])
        if run.device_type == 'cuda' and rng[rank]['cuda'] is not None:
            torch.cuda.set_rng_state(rng[rank]['cuda'])
    else:
        log(f"resume: checkpoint from {len(rng)} processes, now {run.world_size}: random streams restart from seed")
    start_iter, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    log(f"resuming from {cfg['out_dir']}/ckpt.pt at iter {start_iter} (best val loss {best_val_loss:.4f})")
    return start_iter, best_val_loss


def rng_states(run):
    """Every rank's random streams (dropout, data windows), so resume repeats them exactly."""
    mine = {'torch': torch.get_rng_state(), 'data': run.data_gen.get_state(),
            'cuda': torch.cuda.get_rng_state() if run.device_type == 'cuda' else None}
    if not run.ddp:
        return [mine]
    states = [None] * run.world_size
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(cfg, run, it, best_val_loss, rng=None):
    """best_model_params.pt (weights only) without rng; with rng (every rank's random streams) ckpt.pt:
    all a resume needs, the --max_minutes fit, the W&B run and a fine-tune's source included."""
    state = {'model': run.model.state_dict(), 'model_args': run.model_args, 'config': cfg, 'iter_num': it,
             'best_val_loss': best_val_loss, 'budget_fixed': run.budget_fixed, 'wandb_run_id': run.wandb_id,
             'started_from': run.started_from}
    if rng is None:
        torch_save(state, os.path.join(cfg['out_dir'], 'best_model_params.pt'))
        return
    state.update(optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), rng=rng)
    torch_save(state, os.path.join(cfg['out_dir'], 'ckpt.pt'))


def request_stop(run, signum, frame):
    """Ctrl-C / SIGTERM: finish the current step, then stop_and_save. A second one quits at once."""
    if run.stop_signal:
        raise KeyboardInterrupt  # the second signal: quit now, without saving
    run.stop_signal = signum
    if run.master:
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
              f"(press Ctrl-C again to quit without saving)", flush=True)


def stop_and_save(cfg, run, it, best_val_loss):
    """After a Ctrl-C / SIGTERM on any rank: ckpt.pt as of this step, W&B finished, exit 130 / 143."""
    rng = rng_states(run)  # every rank takes part in gathering them
    if run.master:
        save_checkpoint(cfg, run, it, best_val_loss, rng)
        print(f"interrupted at iter {it}: saved {cfg['out_dir']}/ckpt.pt; continue with --init_from=resume", flush=True)
    code = 128 + (run.stop_signal or signal.SIGTERM)  # 130 after Ctrl-C, 143 after SIGTERM (or another rank's)
    if run.wandb:
        run.wandb.finish(exit_code=code)
    if run.ddp:
        dist.destroy_process_group()
    sys.exit(code)


def evaluate(cfg, run, it, best_val_loss, row):
    """Rank 0: losses to stdout and log.jsonl (with row, the timing), the best weights, and ckpt.pt (iter 0
    too: a resume point, and what --max_minutes times). Returns (best val loss, seconds of the estimate)."""
    rng = rng_states(run)  # every rank takes part in gathering them
    if not run.master:
        return best_val_loss, 0.0
    t0 = time.time()
    losses = estimate_loss(run.eval_model, run.splits, cfg, run.ctx, run.device)
    loss_s = time.time() - t0
    if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
        die(f"eval loss is {losses} at iter {it}: training diverged; the checkpoints in "
            f"{cfg['out_dir']} are from before. Lower --learning_rate or check the data")
    print(f"eval iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if cfg['eval_only']:
        return best_val_loss, loss_s
    row = {'iter': it, 'tokens': it * run.tokens_per_iter, 'train_loss': losses['train'],
           'val_loss': losses['val'], 'lr': get_lr(it, cfg), **row}
    log_row(cfg['out_dir'], row, run.wandb)
    improved = losses['val'] < best_val_loss
    best_val_loss = min(best_val_loss, losses['val'])
    if it > 0 and improved:
        save_checkpoint(cfg, run, it, best_val_loss)
    if improved or cfg['always_save_checkpoint'] or it == cfg['max_iters']:
        save_checkpoint(cfg, run, it, best_val_loss, rng)
        print(f"saved {cfg['out_dir']}/ckpt.pt" + (" and best_model_params.pt" if it > 0 and improved else ""))
    return best_val_loss, loss_s


def step_result(cfg, run, loss, it):
    """The step's loss as a float and whether to stop (a signal on any rank); a non-finite loss ends the run."""
    if run.ddp:  # average the loss over ranks and agree on stopping, in one small all-reduce
        flags = torch.stack([loss.float(), torch.tensor(float(run.stop_signal), device=loss.device)])
        dist.all_reduce(flags)
        loss, stop = flags[0] / run.world_size, flags[1].item() > 0
    else:
        stop = run.stop_signal > 0
    lossf = loss.item()
    if not math.isfinite(lossf):
        die(f"loss is {lossf} at iter {it}: training diverged. The last good checkpoint in "
            f"{cfg['out_dir']} stays; resume from it with a lower --learning_rate or --grad_clip")
    return lossf, stop


def train_loop(cfg, run, it, best_val_loss, elapsed_before):
    """From iter it: evaluate every eval_interval steps, one optimizer step, a log row (a progress line every
    log_interval); --max_minutes fits max_iters after CALIBRATION_STEPS. Returns (last iter, best val loss)."""
    start_iter, tokens_per_iter = it, run.tokens_per_iter
    t_start = t_window = time.time()
    iters_window, train_time, ema_dt = 0, 0.0, None  # steps and seconds since the last eval; smoothed step
    step_times, eval_costs = [], None  # for --max_minutes
    while True:
        calibrating = cfg['max_minutes'] > 0 and not run.budget_fixed  # (max_iters is not the end yet)
        at_resume_point = cfg['init_from'] == 'resume' and it == start_iter  # evaluated before saving
        at_end = it == cfg['max_iters'] and not calibrating
        if cfg['eval_only'] or ((it % cfg['eval_interval'] == 0 or at_end) and not at_resume_point):
            mfu = (run.model.estimate_mfu(tokens_per_iter / run.world_size, train_time / iters_window, run.peak)
                   if iters_window and run.master else 0.0)  # rank 0 measured the peak, and logs
            timing = {'tokens_per_s': round(iters_window * tokens_per_iter / train_time if train_time else 0.0, 1),
                      'mfu': round(mfu, 4), 'elapsed_s': round(elapsed_before + time.time() - t_start, 1)}
            t_eval = time.time()
            best_val_loss, loss_s = evaluate(cfg, run, it, best_val_loss, timing)
            if cfg['eval_only']:
                return it, best_val_loss
            eval_costs = eval_costs or (time.time() - t_eval, loss_s)  # the first: what --max_minutes budgets
            iters_window, train_time, t_window = 0, 0.0, time.time()
        if it >= cfg['max_iters'] and not calibrating:
            return it, best_val_loss

        lr = get_lr(it, cfg)
        batches = [get_batch(run.splits['train'], cfg['batch_size'], cfg['block_size'], run.data_gen, run.device)
                   for _ in range(run.accum)]
        loss = train_step(run.train_model, run.optimizer, run.scaler, batches, lr, cfg['grad_clip'], run.ctx)
        it += 1
        lossf, stop = step_result(cfg, run, loss, it)

        now = time.time()
        dt, t_window = now - t_window, now
        iters_window, train_time = iters_window + 1, train_time + dt
        ema_dt = dt if ema_dt is None else 0.9 * ema_dt + 0.1 * dt
        if calibrating:
            step_times.append(dt)
            if len(step_times) == CALIBRATION_STEPS:
                fit_to_budget(cfg, run, it, step_times, eval_costs)
                t_window = time.time()  # the fitting is not a training step
        if run.master:  # the loss and LR of every step, for the loss curve; a progress line
            row = {'iter': it, 'tokens': it * tokens_per_iter, 'loss': round(lossf, 4), 'lr': lr}
            log_row(cfg['out_dir'], row, run.wandb)
            if it % cfg['log_interval'] == 0:
                mfu = run.model.estimate_mfu(tokens_per_iter / run.world_size, ema_dt, run.peak)
                print(f"iter {it}/{cfg['max_iters']} | loss {lossf:.4f} | lr {lr:.2e} | {ema_dt * 1000:.0f} ms/iter | "
                      f"{tokens_per_iter / ema_dt:,.0f} tok/s | mfu {mfu * 100:.1f}% | "
                      f"eta {format_eta((cfg['max_iters'] - it) * ema_dt)}", flush=True)
        if stop:
            stop_and_save(cfg, run, it, best_val_loss)


def write_report(cfg, device, dtype):
    """out_dir/report.md, the run's report card: eval.py --report as a user runs it (scripts import no script)."""
    eval_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'eval.py')
    r = subprocess.run([sys.executable, eval_py, '--report', f"--out_dir={cfg['out_dir']}", f'--device={device}',
                        f'--dtype={dtype}'], capture_output=True, text=True)
    print(r.stdout.strip() if r.returncode == 0 else
          f"warning: the report card failed ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}); "
          f"retry with python eval.py --report --out_dir={cfg['out_dir']}", flush=True)


def main(argv=None):
    given = set()  # the keys a config file or flag set: a fine-tune's shape must agree with its source
    cfg = parse_config(config_defaults(globals()), argv, script=__file__, given=given)
    warnings = check_config(cfg)

    run = setup(cfg)  # processes, device, precision, seeds
    log = print if run.master else (lambda *a, **k: None)
    for line in warnings:
        log(line)

    # data and model shape: from the config, or from the checkpoint on resume or a fine-tune
    ckpt = None  # from scratch
    if cfg['init_from'] == 'resume':
        ckpt = read_resume_checkpoint(cfg, run, log)
    elif cfg['init_from'] != 'scratch':
        ckpt = finetune_source(cfg, given, log)
        run.started_from = cfg['init_from']
    where = cfg['out_dir'] if cfg['init_from'] == 'resume' else cfg['init_from']  # the checkpoint's
    vocab_size = vocab_size_of(cfg['data_dir'], ckpt and ckpt['model_args']['vocab_size'], where)
    run.model_args = {**{k: cfg[k] for k in MODEL_KEYS}, 'vocab_size': vocab_size}
    run.splits = open_splits(cfg['data_dir'], vocab_size, cfg['block_size'])
    log("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in sorted(cfg.items())))

    # model and optimizer, fresh or as the checkpoint left them
    start_iter, best_val_loss = build_model(cfg, run, ckpt, log)
    ckpt = None  # free the loaded tensors
    run.eval_model = torch.compile(run.model) if cfg['compile'] else run.model  # rank 0 evaluates: never through DDP
    run.train_model = run.eval_model
    if run.ddp:
        run.train_model = DDP(run.eval_model, device_ids=[run.local_rank] if run.device_type == 'cuda' else None)
    run.peak = cfg['peak_flops']  # the FLOP/s that MFU is relative to
    if run.master and run.peak <= 0:
        run.peak = max(matmul_flops(run.device, run.dtype)[1])
        log(f"MFU is relative to {run.peak / 1e12:.3f} TFLOP/s, a {run.dtype} matmul measured now "
            f"(set --peak_flops to use a datasheet figure)")
    log(f"{run.tokens_per_iter:,} tokens per step ({run.world_size} process(es) x {run.accum} micro-batches x "
        f"{cfg['batch_size']} x {cfg['block_size']}), {run.dtype} on {run.device}")

    # the loop, then the end
    training = run.master and not cfg['eval_only']
    elapsed_before = start_log(cfg['out_dir'], start_iter, cfg['init_from']) if training else 0.0
    if training and cfg['wandb_log']:
        run.wandb = start_wandb(cfg, run.wandb_id)
        run.wandb_id = run.wandb.id
    signal.signal(signal.SIGINT, partial(request_stop, run))
    signal.signal(signal.SIGTERM, partial(request_stop, run))
    it, best_val_loss = train_loop(cfg, run, start_iter, best_val_loss, elapsed_before)
    if training:
        print(f"done: {it} iters, best val loss {best_val_loss:.4f}, peak memory {peak_memory(run.device) / 1e9:.2f} GB"
              f"{' (GPU)' if run.device_type == 'cuda' else ' (RSS)'}; wrote {plot_log(cfg['out_dir'])}")
        if cfg['report']:
            write_report(cfg, run.device, run.dtype)
        if run.wandb:
            run.wandb.finish()
    if run.ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: quit without saving
        sys.exit(130)
