"""
Evaluate a trained SLM checkpoint: exact loss over a whole file, perplexity, bits per
byte, story quality from fixed prompts, and a one-page report card for a training run.

    python eval.py --ckpt=out/best_model_params.pt --data=data/tinystories/val.bin
    python eval.py --text_files=../shared/data/tinystories/validation.txt
    python eval.py --report --out_dir=out        # writes out/report.md

Window policy of the full pass. The file's tokens are read as one stream with an
<|endoftext|> put in front, so the first story is predicted the same way as every other
(after an end-of-text), and *every* token of the file is a target exactly once. Windows
of block_size tokens start every `stride` tokens. With the default stride = block_size
they do not overlap: each token is predicted from the tokens before it in its window
(1..block_size of context, like the random windows train.py estimates val loss on, so
the numbers compare with the training log). A smaller stride (say block_size // 2) gives
every token after the first window at least block_size - stride tokens of context, at
block_size / stride times the compute; each window then scores only the targets no
earlier window scored.

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the stories' text. The
end-of-text tokens are scored (they are the cost of knowing where a story ends) but add
no bytes. Unlike loss per token it does not depend on the tokenizer, so it compares
with models that use other vocabularies.
"""
import math
import os
import re
import statistics
import time
from datetime import datetime, timezone

import numpy as np
import torch

from checkpoints import load_model
from common import (atomic_write, check_writable, config_defaults, die,
                    parse_config)
from data import EOT_TOKEN, encode_stories, get_tokenizer, open_split, read_meta, read_stories
from device import autocast, pick_device, pick_dtype
from engine import generate
from runlog import load_log, plot_log

# -----------------------------------------------------------------------------
out_dir = 'out'        # the run: --report writes out_dir/report.md
ckpt = ''              # checkpoint; '' = out_dir/best_model_params.pt
data = ''              # a .bin of uint16 tokens; '' = the checkpoint's data_dir/val.bin
text_files = ''        # instead of --data: comma-separated TinyStories-layout text files
batch_size = 16        # windows per forward pass; in [1, inf)
block_size = 0         # window length; 0 = the model's context length; in [0, inf)
stride = 0             # tokens between window starts; 0 = block_size (no overlap); in [0, inf)
num_samples = 10       # stories for the quality figures; 0 skips them; in [0, inf)
max_new_tokens = 200   # a story that has not ended by then counts as not ended; in [1, 1_000_000]
temperature = 0.8      # for the quality stories, as sample.py; in [0, inf)
top_k = 200            # 0 or None = all tokens; in [0, inf)
top_p = 1.0            # 1.0 = off; in (0, 1]
seed = 1337            # story i is drawn with seed + i; in [0, 2**63)
show = 3               # stories to print; in [0, inf)
report = False         # write out_dir/report.md instead of printing an evaluation
device = 'auto'        # auto, cpu, cuda, cuda:1, mps
dtype = 'auto'         # auto, float32, bfloat16, float16
# -----------------------------------------------------------------------------

# Fixed prompts: the same openings every run, so quality figures compare across runs.
PROMPTS = ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog",
           "The sun was shining and", "In a small house near the woods"]


# -----------------------------------------------------------------------------
# full pass: exact mean loss over every token of a file

def read_bin(path, vocab_size):
    """Tokens of a .bin and the UTF-8 bytes of its text (None when no meta.json says)."""
    if not os.path.isfile(path):
        die(f"no data at {path}: run `python prepare.py` or pass --data=FILE.bin / --text_files=A.txt")
    folder, name = os.path.split(os.path.abspath(path))
    meta = read_meta(folder)
    if meta is not None:
        for split, info in meta.get('splits', {}).items():
            if info.get('file') == name:  # open_split checks size, dtype and vocabulary against meta.json
                return open_split(folder, split, vocab_size), info.get('text_bytes')
    size = os.path.getsize(path)
    if size == 0 or size % 2:
        die(f"{path} is {size} bytes, not a non-empty file of uint16 tokens: re-run `python prepare.py`")
    return np.memmap(path, dtype=np.uint16, mode='r'), None


def read_text_files(paths):
    """Tokenize TinyStories-layout text files exactly as prepare.py does; (tokens, text bytes)."""
    stories = []
    for path in paths:
        if not os.path.isfile(path):
            die(f"text file {path} not found: --text_files takes comma-separated paths")
        stories += read_stories(path)
    if not stories:
        die(f"no stories in {', '.join(paths)}: the files hold only blank lines and <|endoftext|>")
    return encode_stories(stories), sum(len(s.encode('utf-8')) for s in stories)


def num_windows(n_tokens, block_size, stride):
    """Windows needed so that the last token is scored (the stream is EOT + tokens)."""
    return 1 + max(0, math.ceil((n_tokens - block_size) / stride))


def stream_slice(tokens, a, b):
    """Positions a..b-1 of the stream EOT + tokens, as int64."""
    part = np.asarray(tokens[max(a - 1, 0):max(b - 1, 0)], dtype=np.int64)
    return np.concatenate([[EOT_TOKEN], part]) if a == 0 else part


@torch.no_grad()
def evaluate_tokens(model, tokens, block_size=0, stride=0, batch_size=16, device='cpu',
                    dtype='float32', progress=False):
    """Mean loss per token over all of `tokens` (see the window policy at the top)."""
    T = block_size or model.config.block_size
    S = stride or T
    if T > model.config.block_size:
        die(f"--block_size={T} is longer than the model's context ({model.config.block_size} tokens): "
            f"use --block_size={model.config.block_size} or less")
    if not 1 <= S <= T:
        die(f"--stride={S} must be between 1 and the block size {T}")
    n_tokens = len(tokens)
    if n_tokens == 0:
        die("the data holds no tokens: evaluate a non-empty file")
    top = int(np.max(tokens))
    if top >= model.config.vocab_size:
        die(f"the data has token id {top} but the model's vocabulary is {model.config.vocab_size}: "
            f"the data was tokenized for another model; re-run prepare.py or pick a matching --ckpt")
    model.eval()
    n_win = num_windows(n_tokens, T, S)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    scored = 0
    t0 = last_print = time.time()
    for first in range(0, n_win, batch_size):
        rows = range(first, min(first + batch_size, n_win))
        # short last windows are padded at the end: causal attention keeps padding out of real positions
        x = np.full((len(rows), T), EOT_TOKEN, dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        for r, k in enumerate(rows):
            chunk = stream_slice(tokens, k * S, k * S + T + 1)
            n = len(chunk) - 1
            x[r, :n], y[r, :n] = chunk[:-1], chunk[1:]
            if k > 0:
                y[r, :T - S] = -1  # already scored by the window before
        n_valid = int((y != -1).sum())
        xb, yb = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with autocast(device, dtype):
            _, loss = model(xb, yb)
        loss_sum += loss.double() * n_valid  # the model returns the mean over this batch's scored tokens
        scored += n_valid
        if progress and time.time() - last_print > 10:
            last_print = time.time()
            done = rows[-1] + 1
            eta = (last_print - t0) / done * (n_win - done)
            print(f"  {done}/{n_win} windows, {scored:,} tokens, loss {loss_sum.item() / scored:.4f}, "
                  f"eta {eta:.0f}s", flush=True)
    assert scored == n_tokens, f"scored {scored} of {n_tokens} tokens"  # each token exactly once
    loss_sum = loss_sum.item()
    return dict(loss=loss_sum / n_tokens, loss_sum=loss_sum, tokens=n_tokens, windows=n_win,
                block_size=T, stride=S, seconds=time.time() - t0)


def add_bits_per_byte(result, text_bytes):
    result['text_bytes'] = text_bytes
    result['perplexity'] = math.exp(result['loss'])
    result['bits_per_byte'] = result['loss_sum'] / math.log(2) / text_bytes if text_bytes else None
    return result


# -----------------------------------------------------------------------------
# story quality: pure functions on the generated text

def words(text):
    """Lower-case words, punctuation dropped: "Hi, Tom!" -> ['hi', 'tom']."""
    return re.findall(r"[\w']+", text.lower())


def ngrams(ws, n):
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def distinct_n(texts, n):
    """Distinct n-grams / all n-grams over all texts (Li et al. 2016); 0.0 if there are none."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_fraction(text, n=4):
    """Share of a story's n-grams that repeat an earlier n-gram of the same story (loops)."""
    grams = ngrams(words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def quality_metrics(texts, ended):
    """Figures over generated stories (continuations only; the prompts are ours, not the model's)."""
    with_4grams = [t for t in texts if len(words(t)) >= 4]
    return {
        'samples': len(texts),
        'distinct_1': distinct_n(texts, 1),
        'distinct_2': distinct_n(texts, 2),
        'distinct_3': distinct_n(texts, 3),
        'repeated_4grams': (sum(repeated_ngram_fraction(t) for t in with_4grams) / len(with_4grams)
                            if with_4grams else 0.0),
        'ended': sum(ended) / len(ended) if ended else 0.0,
        'mean_words': sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0,
    }


@torch.no_grad()
def sample_stories(model, num_samples, max_new_tokens=200, temperature=0.8, top_k=200, top_p=1.0,
                   seed=1337, device='cpu', dtype='float32'):
    """num_samples stories from the fixed prompts in turn; sample i is seeded with seed + i."""
    enc = get_tokenizer()
    model.eval()
    stories = []
    for i in range(num_samples):
        prompt = PROMPTS[i % len(PROMPTS)]
        # a fresh story starts after <|endoftext|>, as every story in the training data does
        idx = torch.tensor([[EOT_TOKEN] + enc.encode_ordinary(prompt)], dtype=torch.long, device=device)
        torch.manual_seed(seed + i)
        with autocast(device, dtype):
            out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                           top_p=top_p if top_p < 1.0 else None, eot_token=EOT_TOKEN)
        new = out[0, idx.size(1):].tolist()
        ended = EOT_TOKEN in new
        new = new[:new.index(EOT_TOKEN)] if ended else new
        stories.append(dict(prompt=prompt, text=enc.decode(new), ended=ended))
    return stories


def evaluate_quality(model, **kwargs):
    stories = sample_stories(model, **kwargs)
    metrics = quality_metrics([s['text'] for s in stories], [s['ended'] for s in stories])
    return metrics, stories


def format_quality(q):
    return (f"distinct-1/2/3 {q['distinct_1']:.3f} / {q['distinct_2']:.3f} / {q['distinct_3']:.3f}, "
            f"repeated 4-grams {q['repeated_4grams']:.1%}, ended with <|endoftext|> {q['ended']:.0%}, "
            f"mean length {q['mean_words']:.1f} words ({q['samples']} samples)")


# -----------------------------------------------------------------------------
# run report: out_dir/report.md

def ensure_loss_curve(out_dir):
    """out_dir/loss_curve.png, (re)drawn when missing or older than the log."""
    png, log = os.path.join(out_dir, 'loss_curve.png'), os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(png) or os.path.getmtime(png) < os.path.getmtime(log):
        plot_log(out_dir)
    return png


def fmt(v, spec='.4f'):
    return 'n/a' if v is None else format(v, spec)


def logged_median(log, key):
    """Median of a speed column over the evals that measured it (the first eval logs 0)."""
    values = [r[key] for r in log if (r.get(key) or 0) > 0]
    return statistics.median(values) if values else None


def md_table(rows):
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def md_escape(text):
    """Generated text shown as text: no stray emphasis, links or html."""
    return re.sub(r'([\\`*_{}\[\]<>#|])', r'\\\1', text)


def quote(text):
    return "\n".join("> " + line for line in text.strip('\n').split('\n'))


def gather_report(out_dir, ckpt_path='', data_path='', device='auto', dtype='auto', batch_size=16,
                  num_samples=10, max_new_tokens=200, temperature=0.8, top_k=200, top_p=1.0, seed=1337):
    """What the report shows, as a plain dict: the run's log and config, the model's size, a
    full pass over the validation data, story quality and the stories."""
    ckpt_path = ckpt_path or os.path.join(out_dir, 'best_model_params.pt')
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    log = load_log(out_dir)
    model, ck = load_model(ckpt_path, device)
    cfg = ck.get('config') or {}
    data_path = data_path or os.path.join(cfg.get('data_dir', 'data/tinystories'), 'val.bin')
    tokens, text_bytes = read_bin(data_path, model.config.vocab_size)
    ev = add_bits_per_byte(evaluate_tokens(model, tokens, batch_size=batch_size, device=device,
                                           dtype=dtype), text_bytes)
    quality, stories = evaluate_quality(model, num_samples=max(num_samples, 5),
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed, device=device, dtype=dtype)
    return dict(
        out_dir=out_dir, log=log, config=cfg, model_args=ck['model_args'],
        ckpt_path=ckpt_path, iter_num=ck.get('iter_num', 'n/a'),
        best_val_loss=min([r['val_loss'] for r in log] + [ck.get('best_val_loss', math.inf)]),
        params=model.get_num_params(non_embedding=False), params_non_embedding=model.get_num_params(),
        data_path=data_path, device=device, dtype=dtype, eval=ev, quality=quality, stories=stories,
        sampling=dict(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                      max_new_tokens=max_new_tokens))


def summary_table(report):
    """The report's first table: size, speed and the losses, from gather_report's dict."""
    log, ev = report['log'], report['eval']
    last = log[-1]
    mfu = logged_median(log, 'mfu')  # a fraction in the log
    n_all, n_body = report['params'], report['params_non_embedding']
    return md_table([
        ('parameters', f"{n_all / 1e6:.2f}M ({n_body / 1e6:.2f}M non-embedding)"),
        ('iterations', last['iter']),
        ('tokens seen', f"{last['tokens']:,}"),
        ('wall time', f"{last['elapsed_s'] / 60:.1f} min" if last.get('elapsed_s') is not None else 'n/a'),
        ('tokens/s (median of logged intervals)', fmt(logged_median(log, 'tokens_per_s'), ',.0f')),
        ('MFU (median of logged intervals)', 'n/a' if mfu is None else f"{mfu:.1%}"),
        ('best val loss (log estimate)', fmt(report['best_val_loss'])),
        ('best train loss (log estimate)', fmt(min(r['train_loss'] for r in log))),
        ('final train / val loss (log estimate)', f"{fmt(last['train_loss'])} / {fmt(last['val_loss'])}"),
        ('val loss, full pass', fmt(ev['loss'])),
        ('val perplexity', fmt(ev['perplexity'], '.2f')),
        ('val bits per byte', fmt(ev['bits_per_byte'])),
    ])


def render_report(report, written):
    """report.md's Markdown from gather_report's dict; written: the time to stamp it with."""
    log, ev, q, cfg = report['log'], report['eval'], report['quality'], report['config']
    sampling, max_new = report['sampling'], report['sampling']['max_new_tokens']
    config_table = (md_table([(k, f"`{v!r}`") for k, v in sorted(cfg.items())]) if cfg else
                    "n/a: the checkpoint stores no training config")
    model_table = md_table(list(report['model_args'].items()) + [
        ('parameters', f"{report['params']:,}"), ('non-embedding parameters', f"{report['params_non_embedding']:,}"),
        ('checkpoint', f"`{report['ckpt_path']}` (iter {report['iter_num']})")])
    log_table = "\n".join(
        ["| iter | tokens | train loss | val loss | lr | tokens/s | MFU |", "|---|---|---|---|---|---|---|"] +
        [f"| {r['iter']} | {r['tokens']:,} | {fmt(r['train_loss'])} | {fmt(r['val_loss'])} | {r['lr']:.2e} | "
         f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} |" for r in log[-10:]])
    bpb = fmt(ev['bits_per_byte']) + (f" ({ev['text_bytes']:,} bytes of text)" if ev['text_bytes'] else
                                      " (no meta.json with text_bytes beside the .bin)")
    eval_table = md_table([
        ('data', f"`{report['data_path']}`"),
        ('tokens scored', f"{ev['tokens']:,} (every token once)"),
        ('windows', f"{ev['windows']:,} of {ev['block_size']} tokens, stride {ev['stride']}"),
        ('loss per token', fmt(ev['loss'])),
        ('perplexity', fmt(ev['perplexity'], '.2f')),
        ('bits per byte', bpb),
        ('time', f"{ev['seconds']:.1f} s on {report['device']} ({report['dtype']})"),
    ])
    drawn = (f"{q['samples']} from the prompts {', '.join(repr(p) for p in PROMPTS)} in turn; "
             f"seed {sampling['seed']}, temperature {sampling['temperature']}, top_k {sampling['top_k']}, "
             f"top_p {sampling['top_p']}, up to {max_new} new tokens")
    quality_table = md_table([
        ('samples', drawn),
        ('distinct-1 / 2 / 3', f"{q['distinct_1']:.3f} / {q['distinct_2']:.3f} / {q['distinct_3']:.3f}"),
        ('repeated 4-grams within a story', f"{q['repeated_4grams']:.1%}"),
        ('ended with <\\|endoftext\\|>', f"{q['ended']:.0%}"),
        ('mean length', f"{q['mean_words']:.1f} words"),
    ])
    samples = "\n\n".join(
        f"**Story {i + 1}** ({'ended' if story['ended'] else f'cut at {max_new} tokens'}):\n\n" +
        quote(f"**{md_escape(story['prompt'])}**{md_escape(story['text'])}")
        for i, story in enumerate(report['stories'][:5]))
    return REPORT.format(
        out_dir=report['out_dir'], written=written.strftime('%Y-%m-%d %H:%M UTC'), summary=summary_table(report),
        config_table=config_table, model_table=model_table, shown=min(10, len(log)), evals=len(log),
        log_table=log_table, eval_table=eval_table, quality_table=quality_table, samples=samples)


# report.md: gather_report's figures in the sections render_report fills in
REPORT = """# SLM run report: `{out_dir}`

Written {written} by eval.py (`python eval.py --report --out_dir={out_dir}`).
"Log estimate" figures are train.py's, on random batches; "full pass" figures score every
validation token once (see eval.py for the window policy).

## Summary

{summary}

## Config

{config_table}

## Model

{model_table}

## Training

Last {shown} of {evals} evaluations in `log.jsonl`:

{log_table}

## Loss curve

![loss curve](loss_curve.png)

## Evaluation

{eval_table}

## Story quality

{quality_table}

## Sample stories

{samples}
"""


def write_report(out_dir, ckpt_path='', data_path='', device='auto', dtype='auto', batch_size=16,
                 num_samples=10, max_new_tokens=200, temperature=0.8, top_k=200, top_p=1.0, seed=1337):
    """Summarize a run in out_dir/report.md: config, size, speed, losses, bits per byte,
    loss curve, story quality and five stories. Returns the report's path."""
    report = gather_report(out_dir, ckpt_path, data_path, device, dtype, batch_size, num_samples,
                           max_new_tokens, temperature, top_k, top_p, seed)
    ensure_loss_curve(out_dir)
    text = render_report(report, datetime.now(timezone.utc))
    path = os.path.join(out_dir, 'report.md')
    atomic_write(path, lambda f: f.write(text), mode='w')
    return path


# -----------------------------------------------------------------------------

def check_config(cfg):
    """Bad flag values stop here, with one line, before the model or any data is loaded."""
    if cfg['block_size'] and cfg['stride'] > cfg['block_size']:  # windows would skip tokens
        die(f"--stride={cfg['stride']} must be between 1 and the block size {cfg['block_size']}")
    if cfg['data'] and cfg['text_files']:
        die("pass either --data=FILE.bin or --text_files=A.txt,B.txt, not both")
    if cfg['report'] and cfg['text_files']:
        die("--report evaluates a .bin (--data); drop --text_files")
    if cfg['data'] and not os.path.isfile(cfg['data']):
        kind = 'a folder, not a .bin file' if os.path.isdir(cfg['data']) else 'no such file'
        die(f"no data at {cfg['data']} ({kind}): run `python prepare.py` or pass --data=FILE.bin / --text_files=A.txt")
    text_files = [p for p in cfg['text_files'].split(',') if p]
    if cfg['text_files'] and not text_files:
        die(f"--text_files={cfg['text_files']!r} names no file: pass comma-separated paths")
    for path in text_files:
        if not os.path.isfile(path):
            die(f"text file {path} {'is a folder' if os.path.isdir(path) else 'not found'}: "
                f"--text_files takes comma-separated paths of text files")
    if not cfg['ckpt'] and os.path.isfile(cfg['out_dir']):
        die(f"--out_dir={cfg['out_dir']} is a file, not a run folder: pass the folder train.py wrote, "
            f"or the checkpoint itself as --ckpt=FILE")
    if cfg['report']:  # report.md and loss_curve.png are written at the end: find out now
        check_writable(cfg['out_dir'], '--out_dir')
        for name in ('report.md', 'loss_curve.png'):
            if os.path.isdir(os.path.join(cfg['out_dir'], name)):
                die(f"{os.path.join(cfg['out_dir'], name)} is a folder, so --report cannot write it: "
                    f"move it away or pick another --out_dir")


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, nullable=('top_k',), script=__file__)
    check_config(cfg)
    dev = pick_device(cfg['device'])
    dt = pick_dtype(cfg['dtype'], dev)
    ckpt_path = cfg['ckpt'] or os.path.join(cfg['out_dir'], 'best_model_params.pt')
    gen = dict(max_new_tokens=cfg['max_new_tokens'], temperature=cfg['temperature'], top_k=cfg['top_k'],
               top_p=cfg['top_p'], seed=cfg['seed'])
    if cfg['report']:
        path = write_report(cfg['out_dir'], ckpt_path, cfg['data'], dev, dt, cfg['batch_size'],
                            cfg['num_samples'], **gen)
        print(f"wrote {path}")
        return
    model, ck = load_model(ckpt_path, dev)
    if cfg['text_files']:
        source = cfg['text_files']
        tokens, text_bytes = read_text_files([p for p in cfg['text_files'].split(',') if p])
    else:
        source = cfg['data'] or os.path.join((ck.get('config') or {}).get('data_dir', 'data/tinystories'), 'val.bin')
        tokens, text_bytes = read_bin(source, model.config.vocab_size)
    print(f"evaluating {ckpt_path} on {source}: {len(tokens):,} tokens, {dev} {dt}")
    ev = add_bits_per_byte(evaluate_tokens(model, tokens, cfg['block_size'], cfg['stride'], cfg['batch_size'],
                                           dev, dt, progress=True), text_bytes)
    print(f"windows      {ev['windows']:,} of {ev['block_size']} tokens, stride {ev['stride']}"
          f"{' (no overlap)' if ev['stride'] == ev['block_size'] else ''}")
    print(f"loss         {ev['loss']:.4f} nats/token")
    print(f"perplexity   {ev['perplexity']:.3f}")
    print(f"bits/byte    " + (f"{ev['bits_per_byte']:.4f} ({text_bytes:,} bytes of text)" if text_bytes else
                              "n/a (no meta.json with text_bytes beside the .bin)"))
    print(f"tokens       {ev['tokens']:,} in {ev['seconds']:.1f} s ({ev['tokens'] / ev['seconds']:,.0f} tokens/s)")
    if cfg['num_samples'] > 0:
        quality, stories = evaluate_quality(model, num_samples=cfg['num_samples'], device=dev, dtype=dt, **gen)
        print(f"quality      {format_quality(quality)}")
        for s in stories[:cfg['show']]:
            print(f"---\n{s['prompt']}{s['text']}" + ("" if s['ended'] else " [...]"))


if __name__ == '__main__':
    main()
