"""
Write stories with a trained SLM model, streamed to the terminal as they are generated.

    python sample.py --start="A little girl"         # continue a prompt
    python sample.py --start=FILE:prompt.txt         # the prompt from a file
    python sample.py --num_samples=1 --temperature=0 # greedy: the single most likely story
    python sample.py --ckpt=other/best_model_params.pt --top_p=0.9

Every sample starts as a fresh story (after <|endoftext|>, which the training data puts
before each story) and ends at the model's next <|endoftext|> or after max_new_tokens.
The text goes to stdout; warnings and the speed summary go to stderr.
"""
import os
import sys
import time

import torch

from checkpoints import load_model
from common import config_defaults, die, parse_config
from data import get_tokenizer, story_text
from device import autocast, pick_device, pick_dtype
from engine import generate_stream

# -----------------------------------------------------------------------------
out_dir = 'out'          # reads out_dir/best_model_params.pt, the best checkpoint train.py saved
ckpt = ''                # a checkpoint file (or exported folder) to use instead
start = ''               # the prompt, or FILE:path to read it from a file; '' = a story from scratch
num_samples = 3          # stories to write, one after another; in [1, inf)
max_new_tokens = 300     # per sample; most TinyStories stories end well before; in [1, 1_000_000]
temperature = 0.8        # 0 = greedy (always the most likely token); higher = more varied; in [0, inf)
top_k = 200              # sample among the top_k most likely tokens only (0 or None = all); in [0, inf)
top_p = 1.0              # nucleus: among the fewest tokens whose probabilities reach top_p (1.0 = off); in (0, 1]
seed = 1337              # the same seed and flags give the same stories; in [0, 2**63)
device = 'auto'          # auto = cuda, else mps, else cpu
dtype = 'auto'           # float32, bfloat16 or float16; auto = bf16/fp16 on GPUs, fp32 elsewhere
compile = False          # torch.compile the model's forward (PyTorch 2; a slow first sample)
kv_cache = True          # False re-runs the whole context every token, as nanoGPT (slow; for checks)
fast_window = False      # past block_size keep half the window instead of re-running it:
                         # faster long samples, slightly worse text (docs/sampling.md)
# -----------------------------------------------------------------------------


def check_config(cfg):
    """Bad flag values stop here, with one line, before the model is loaded."""
    if cfg['fast_window'] and not cfg['kv_cache']:  # the no-cache loop has no window to halve
        die("--fast_window=True needs the kv cache: drop --kv_cache=False or --fast_window")
    if not cfg['ckpt'] and os.path.isfile(cfg['out_dir']):
        die(f"--out_dir={cfg['out_dir']} is a file, not a run folder: pass the folder train.py wrote, "
            f"or the checkpoint itself as --ckpt=FILE")


def read_prompt(start):
    if not start.startswith('FILE:'):
        return start
    path = start[len('FILE:'):]
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read the prompt file {path!r} ({e.__class__.__name__}): pass --start=FILE:PATH "
            f"to a UTF-8 text file, or the prompt itself as --start=\"...\"")


def print_story(enc, token_ids, out):
    """Write token ids to out as text as they come, up to <|endoftext|>; returns how many were read."""
    read = []
    for piece in story_text(enc, (read.append(t) or t for t in token_ids)):
        out.write(piece)
        out.flush()
    return len(read)


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, nullable=('top_k',), script=__file__)
    check_config(cfg)
    prompt = read_prompt(cfg['start'])  # a bad prompt file stops before the model loads
    dev = pick_device(cfg['device'])
    precision = pick_dtype(cfg['dtype'], dev)

    model, _ = load_model(cfg['ckpt'] or os.path.join(cfg['out_dir'], 'best_model_params.pt'), dev)
    model.eval()
    if cfg['compile']:
        model.compile(dynamic=True)  # the forward generate runs; the first sample is slow
    enc = get_tokenizer()
    block_size = model.config.block_size

    # the prompt follows an <|endoftext|>, as a story does in the training data
    prompt_ids = enc.encode(prompt, allowed_special={'<|endoftext|>'})
    if len(prompt_ids) > block_size:
        print(f"warning: the prompt is {len(prompt_ids)} tokens, longer than the model's block_size "
              f"{block_size}: keeping its last {block_size} tokens", file=sys.stderr)
        prompt_ids = prompt_ids[-block_size:]
        prompt = enc.decode(prompt_ids, errors='replace')
    ids = ([enc.eot_token] + prompt_ids)[-block_size:]
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    # the stories' own random stream: the same seed gives the same stories whatever else drew
    # random numbers before (building the model does), and serve.py's equal ones
    generator = torch.Generator(device=dev).manual_seed(cfg['seed'])

    n_tokens, t0 = 0, time.time()
    try:
        for _ in range(cfg['num_samples']):
            sys.stdout.write(prompt)
            with autocast(dev, precision):
                stream = generate_stream(model, x, cfg['max_new_tokens'], cfg['temperature'], cfg['top_k'],
                                         cfg['top_p'], eot_token=enc.eot_token,
                                         use_kv_cache=cfg['kv_cache'], fast_window=cfg['fast_window'],
                                         generator=generator)
                n_tokens += print_story(enc, (token.item() for token in stream), sys.stdout)
            sys.stdout.write('\n---------------\n')
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write('\n')
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python sample.py | head`: the reader has gone, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise
        sys.exit(1)
    seconds = time.time() - t0
    print(f"{cfg['num_samples']} samples, {n_tokens} tokens in {seconds:.1f} s "
          f"({n_tokens / seconds:.1f} tokens/s, {dev}, {precision})", file=sys.stderr)


if __name__ == '__main__':
    main()
