"""
Helpers every SLM script shares: config files and --key=value flags, one-line
errors, atomic file writes, device/dtype choice, the tokenizer, the tokenized
data on disk and checkpoints. Kept in one place so the scripts stay short.
"""
import ast
import json
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, appended after every story


def die(msg):
    """Stop with one clear line on stderr (exit code 1): the problem and the fix."""
    sys.exit(f"error: {msg}")


# -----------------------------------------------------------------------------
# config: module-level defaults <- python config files <- --key=value flags

def config_defaults(namespace):
    """The config keys of a script: its module-level plain values, nanoGPT style
    (UPPER_CASE constants are not options)."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not k.isupper()
            and isinstance(v, (int, float, bool, str, type(None)))}


def _check_type(key, value, default, source, nullable):
    if value is None and default is not None and key not in nullable:
        die(f"{source}: {key} cannot be None: pass a {type(default).__name__} like the default {default!r}")
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    die(f"{source}: {key} must be {type(default).__name__} (like the default {default!r}), "
        f"got {type(value).__name__} {value!r}")


def config_meanings(script):
    """{key: the comment beside its default} in a script's config block: --help prints these,
    so the documentation of a flag is the one comment in the code. An indented comment line
    right below continues the comment above it."""
    meanings, key = {}, None
    with open(script) as f:
        for line in f:
            m = re.match(r"(\w+) = [^#]*#\s*(.*)", line)
            if m:
                key = m.group(1)
                meanings[key] = m.group(2).strip()
            elif key and re.match(r"\s+#", line):
                meanings[key] += ' ' + line.strip().lstrip('#').strip()
            else:
                key = None
    return meanings


def print_help(defaults, script):
    """Every key with its default and its meaning, in the order the script defines them."""
    meanings = config_meanings(script) if script else {}
    flags = {k: f"--{k}={v!r}" for k, v in defaults.items()}
    width = max(map(len, flags.values()))
    print(f"usage: python {os.path.basename(script or 'script.py')} [config.py ...] [--key=value ...]\n"
          f"Config files (Python) are applied first, then the flags. Keys, defaults and meanings:")
    for k, flag in flags.items():
        print(f"  {flag:<{width}}  {meanings.get(k, '')}".rstrip())


def parse_config(defaults, argv=None, nullable=(), script=None):
    """Apply config files (positional args) then --key=value flags to a copy of defaults.

    Unknown keys and wrong types stop with a message listing the valid keys; None is a value
    only for the keys in nullable (and those whose default is None). --help prints every key
    with its default and the comment beside it in script (the caller's __file__).
    A config file is plain Python whose top-level assignments set config keys.
    """
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    valid = ", ".join(sorted(defaults))
    for arg in argv:
        if arg in ('-h', '--help'):
            print_help(defaults, script)
            sys.exit(0)
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                die(f"config file {arg!r} not found (arguments are config files or --key=value flags)")
            file_ns = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), file_ns)
            except Exception as e:
                die(f"config file {arg} failed to run: {type(e).__name__}: {e}")
            for key, value in config_defaults(file_ns).items():
                if key not in defaults:
                    die(f"config file {arg} sets unknown key {key!r}; valid keys: {valid}")
                config[key] = _check_type(key, value, defaults[key], arg, nullable)
            continue
        key, eq, raw = arg[2:].partition('=')
        if key not in defaults:
            die(f"unknown option --{key}; valid keys: {valid}")
        if not eq:
            if not isinstance(defaults[key], bool):
                die(f"--{key} needs a value: --{key}=VALUE")
            raw = 'True'  # a bare --flag switches a boolean on
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string: --device=cuda
        if isinstance(defaults[key], str) and not isinstance(value, str):
            value = raw  # --out_dir=123 is still a path
        config[key] = _check_type(key, value, defaults[key], f"--{key}", nullable)
    for key, value in config.items():  # a path with a NUL byte fails deep inside open()
        if isinstance(value, str) and '\0' in value:
            die(f"{key} holds a NUL byte: pass plain text")
    return config


# -----------------------------------------------------------------------------
# files: written to a temp name in the same folder, then renamed into place

def atomic_write(path, write_fn, mode='wb'):
    """Call write_fn(file) on a temp file beside path, then rename it to path.

    A crash or Ctrl-C mid-write leaves the old file (or none), never half a file.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(path, flag, folder=True):
    """Stop now, with one line, if path (a folder, or a file when folder=False) could not be
    written later: it is the wrong kind, sits under a file, or its place is not writable.
    Creates nothing, so a run that stops here leaves nothing behind."""
    path = os.path.abspath(path)
    kind = 'folder' if folder else 'file'
    if os.path.exists(path) and os.path.isdir(path) != folder:
        die(f"{flag}={path} is a {'file' if folder else 'folder'}, not a {kind}: pass a {kind} path")
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest part of the path that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        die(f"{flag}={path} cannot be made: {parent} is a file, not a folder; pass another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        die(f"{flag}={path} cannot be written: {parent} is not writable here; pass a writable {flag}")


def save_json(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode='w')


def torch_save(obj, path):
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


# -----------------------------------------------------------------------------
# device and precision

def pick_device(device='auto'):
    """'auto' = cuda, else mps, else cpu. A named device must work here (clear error if not)."""
    import torch
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    try:
        torch.empty(1, device=device)
    except Exception as e:
        die(f"device {device!r} is not usable here ({str(e).splitlines()[0]}): use --device=cpu or --device=auto")
    return device


def pick_dtype(dtype, device):
    """'auto' means bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU/MPS."""
    import torch
    if dtype != 'auto':
        if dtype not in ('float32', 'bfloat16', 'float16'):
            die(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
        return dtype
    if device.startswith('cuda'):
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op in float32."""
    import torch
    if dtype == 'float32':
        return nullcontext()
    ptdtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    return torch.autocast(device_type=device.split(':')[0], dtype=ptdtype)


def peak_memory(device):
    """This process's peak memory so far, in bytes: the CUDA allocator's peak on a GPU, else
    the peak RSS (Python and torch included)."""
    import torch
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)  # KiB on Linux


def sync(device):
    """Wait for queued GPU work, so wall-clock time measures it."""
    import torch
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    elif device.startswith('mps'):
        torch.mps.synchronize()


def timed(fn, device, warmup, repeats):
    """Seconds of each of repeats calls of fn, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_flops(device, dtype, n=0, repeats=3):
    """(n, FLOP/s of each of repeats warmed-up n x n matmuls in dtype): the peak that MFU
    divides by, measured rather than looked up so it fits whatever machine this is.
    n = 0: 8192 on CUDA, 2048 elsewhere, or the first size from 256 up whose matmul takes
    over 0.05 s (a CPU without float16 units runs it ~500x slower: 2048 would take minutes)."""
    import torch
    top = n or (8192 if device.startswith('cuda') else 2048)
    n = n or 256
    ptdtype = getattr(torch, dtype)
    # a generator of its own: train.py measures after restoring a checkpoint's RNG state, and a
    # draw from the global stream there would shift every later dropout mask (resume not exact)
    gen = torch.Generator(device=device).manual_seed(0)
    while True:
        a = torch.randn(n, n, device=device, generator=gen).to(ptdtype)
        b = torch.randn(n, n, device=device, generator=gen).to(ptdtype)
        c = torch.empty(n, n, device=device, dtype=ptdtype)
        if n >= top or timed(lambda: torch.mm(a, b, out=c), device, 1, 1)[0] > 0.05:
            break
        n *= 2
    return n, [2 * n ** 3 / t for t in timed(lambda: torch.mm(a, b, out=c), device, 2, repeats)]


# -----------------------------------------------------------------------------
# tokenizer

OFFLINE_HELP = ("offline? set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files "
                "(e.g. TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache), or run once with internet")


def get_tokenizer(timeout=120):
    """tiktoken's GPT-2 BPE; a clear one-line error when its files cannot be fetched. The first
    call downloads them (~1.5 MB) with requests and no timeout, which a network that drops
    packets would hang forever: so it loads in a thread and gives up after timeout seconds."""
    import threading
    import tiktoken
    result = {}

    def load():
        try:
            result['enc'] = tiktoken.get_encoding('gpt2')
        except Exception as e:
            result['error'] = type(e).__name__
    loader = threading.Thread(target=load, daemon=True)  # daemon: a hung download ends with the process
    loader.start()
    loader.join(timeout)
    if 'enc' not in result:
        die(f"could not load the GPT-2 tokenizer ({result.get('error', f'no answer in {timeout} s')}); "
            f"{OFFLINE_HELP}")
    return result['enc']


# -----------------------------------------------------------------------------
# tokenized data: data_dir/{train,val}.bin (uint16 memmaps) described by meta.json

def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if os.path.isfile(data_dir):
        die(f"{data_dir} is a file, not a folder: pass --data_dir=FOLDER holding train.bin, val.bin and meta.json")
    if not os.path.isfile(path):
        die(f"{path} not found: run `python prepare.py` (or pass --data_dir=FOLDER holding "
            f"train.bin, val.bin and meta.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path} is unreadable ({e}): re-run `python prepare.py --force`")


def open_split(data_dir, split, vocab_size=None):
    """The split's tokens as a read-only uint16 memmap, checked against meta.json.

    Opened read-only and indexed per batch, so RAM stays flat over long runs.
    """
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    info = meta.get('splits', {}).get(split)
    if info is None:
        die(f"{data_dir}/meta.json has no {split!r} split: re-run `python prepare.py --force`")
    if meta.get('dtype') != 'uint16':
        die(f"{data_dir}/meta.json says dtype {meta.get('dtype')!r}; SLM reads uint16 bins: re-run prepare.py")
    if vocab_size is not None and meta.get('vocab_size', 0) > vocab_size:
        die(f"data in {data_dir} uses a {meta.get('vocab_size')}-token vocabulary but the model "
            f"has vocab_size={vocab_size}: use --vocab_size={meta.get('vocab_size')} or matching data")
    if not os.path.isfile(path):
        die(f"{path} not found: run `python prepare.py` (or --force to rebuild)")
    expected = info['tokens'] * np.dtype(np.uint16).itemsize
    size = os.path.getsize(path)
    if size != expected:
        die(f"{path} is {size} bytes but meta.json expects {expected} ({info['tokens']} tokens): "
            f"the file is truncated or stale, re-run `python prepare.py --force`")
    if size == 0:
        die(f"{path} holds no tokens: prepare it from non-empty text")
    return np.memmap(path, dtype=np.uint16, mode='r')


# -----------------------------------------------------------------------------
# checkpoints: {'model': state_dict, 'model_args': dict, ...}, loaded with weights_only=True

def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile (_orig_mod.) and DDP (module.) add to keys."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(('_orig_mod.', 'module.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def read_checkpoint(path, map_location='cpu'):
    import torch
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')):
        from export import load_hf_folder  # a Hugging Face GPT-2 folder (export.py writes these)
        return load_hf_folder(path)
    if os.path.isdir(path):
        die(f"{path} is a folder, not a checkpoint file: pass --ckpt=FOLDER/best_model_params.pt "
            f"(or a Hugging Face GPT-2 folder holding config.json)")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: run `python train.py` first (or pass --ckpt=PATH)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        die(f"could not read checkpoint {path} (corrupt, truncated or not a torch checkpoint: "
            f"{type(e).__name__}); re-save it or pick another with --ckpt")
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        die(f"{path} is not an SLM checkpoint (needs 'model' and 'model_args' entries)")
    return ckpt


def load_model(path, device='cpu'):
    """Build the GPT stored in a checkpoint file; returns (model, checkpoint dict)."""
    from model import GPT, GPTConfig
    ckpt = read_checkpoint(path)
    try:
        model = GPT(GPTConfig(**ckpt['model_args']), verbose=False)
        model.load_state_dict(clean_state_dict(ckpt['model']))
    except (TypeError, RuntimeError) as e:
        detail = ' '.join(line.strip() for line in str(e).splitlines()[1:])[:300] or str(e)
        die(f"checkpoint {path} does not match model.py's GPT: {detail}")
    return model.to(device), ckpt
