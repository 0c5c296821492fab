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


def parse_config(defaults, argv=None, nullable=(), script=None, given=None):
    """Apply config files (positional args) then --key=value flags to a copy of defaults.

    Unknown keys and wrong types stop with a message listing the valid keys; None is a value
    only for the keys in nullable (and those whose default is None). --help prints every key
    with its default and the comment beside it in script (the caller's __file__).
    A config file is plain Python whose top-level assignments set config keys.
    given: a set that receives the keys a config file or flag set (train.py's fine-tune asks).
    """
    given = set() if given is None else given
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
                given.add(key)
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
        given.add(key)
    for key, value in config.items():  # a path with a NUL byte fails deep inside open()
        if isinstance(value, str) and '\0' in value:
            die(f"{key} holds a NUL byte: pass plain text")
    return config


def check_counts(cfg, at_least_one=(), zero_means=None):
    """Stop with one line on a count flag out of range: those in at_least_one must be >= 1; for
    those in zero_means ({key: what 0 means}) 0 is allowed, negatives are not."""
    for key in at_least_one:
        if cfg[key] < 1:
            die(f"--{key}={cfg[key]} must be at least 1")
    for key, zero in (zero_means or {}).items():
        if cfg[key] < 0:
            die(f"--{key}={cfg[key]} is negative: use 0 ({zero}) or more")


def check_generation_flags(cfg):
    """The generation flags sample.py and eval.py share: model.sampling_problem's rule, a bound
    on max_new_tokens (generate allocates room for all of them up front), a 64-bit seed."""
    from model import sampling_problem
    problem = sampling_problem(cfg['temperature'], cfg['top_k'], cfg['top_p'])
    if problem:
        die(f"--{problem}")
    if cfg['max_new_tokens'] > 1_000_000:
        die(f"--max_new_tokens={cfg['max_new_tokens']} is more than 1,000,000: ask for fewer tokens")
    check_seed(cfg)


def check_seed(cfg):
    if not 0 <= cfg['seed'] < 2**63:  # torch.manual_seed takes 64-bit seeds
        die(f"--seed={cfg['seed']} must be between 0 and 2**63 - 1")


# -----------------------------------------------------------------------------
# files: written to a temp name in the same folder, then renamed into place

def disk_full(exc):
    """(cause, fix) when exc is a write that failed for want of room (a full disk or quota, a
    file past the size limit: ENOSPC, EDQUOT, EFBIG), else None. Libraries wrap the OSError:
    torch.save raises a RuntimeError during it ([enforce fail at inline_container.cc]), Rust
    ones (safetensors) put its "os error N" in their message; both are looked through."""
    import errno
    causes = {errno.ENOSPC: ('no space left on device', 'free some space or write to another disk'),
              errno.EFBIG: ("file too large (past the file-size limit, `ulimit -f`, or the filesystem's largest file)",
                            'raise the limit or write to another disk')}
    if hasattr(errno, 'EDQUOT'):  # a full quota (not on every platform)
        causes[errno.EDQUOT] = ('disk quota exceeded', 'free some space or write to another disk')
    seen = set()
    while exc is not None and id(exc) not in seen:  # exc, then what it was raised from or during
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            m = re.search(r'os error (\d+)', str(exc))
            code = int(m.group(1)) if m else None
        if code in causes:
            return causes[code]
        exc = exc.__cause__ or exc.__context__
    return None


def die_if_disk_full(exc, path):
    """Stop with one line naming path when exc is a write that failed for want of room, else
    return (the caller re-raises). Every writer ends here: a full disk reads the same in every
    script."""
    full = disk_full(exc)
    if full:
        die(f"cannot write {path}: {full[0]}: {full[1]}")


def atomic_write(path, write_fn, mode='wb'):
    """Call write_fn(file) on a temp file beside path, then rename it to path.

    A crash or Ctrl-C mid-write leaves the old file (or none), never half a file; a full disk
    stops with one line naming path (die_if_disk_full).
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        die_if_disk_full(e, path)
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


def cpu_has_bf16_matmul():
    """True where the CPU multiplies bf16 matrices in hardware (x86 AVX512-BF16 or AMX). There bf16
    autocast trains ~1.5x faster than fp32 (a 2.2x GEMM rate on a 2-core AMD EPYC); elsewhere
    (older x86, ARM) bf16 is emulated and slower than fp32. config/tinystories_cpu.py asks this."""
    import torch
    checks = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')  # torch.cpu's own feature checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


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
# the training log: out_dir/log.jsonl (train.py writes it): a row per optimizer step (its batch
# loss and LR) and a row per evaluation (train/val loss estimates, speed)

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


def story_text(enc, token_ids):
    """The text of a story's token ids, in pieces as they come, up to its <|endoftext|>
    (sample.py prints them, serve.py streams them). A character can span tokens, so bytes are
    decoded incrementally: whole characters only. An id past the tokenizer's vocabulary (a
    model with a padded one could pick it) has no text."""
    import codecs
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
    for token in token_ids:
        if token == enc.eot_token:
            break
        if token < enc.n_vocab:
            yield decoder.decode(enc.decode_single_token_bytes(token))
    yield decoder.decode(b'', final=True)


# -----------------------------------------------------------------------------
# stories: TinyStories-layout text files (each story followed by a line <|endoftext|>)

STORY_SEPARATOR = '<|endoftext|>'
# prepare.py's worker task size: ~256 KB of text (~300 stories) keeps the per-task overhead
# small, and the main process's heap small: with 1 MB tasks it fragmented to ~210 MB RSS.
STORY_CHUNK = 1 << 18  # bytes of a file per piece


def check_file(path):
    """A readable, non-empty text file of stories (prepare.py, eval.py and bench.py read them)."""
    if not os.path.exists(path):
        die(f"{path} not found: pass existing text files in the TinyStories layout to --train_files/--val_files")
    if not os.path.isfile(path):
        die(f"{path} is not a file: pass text files (comma-separated) to --train_files/--val_files")
    if os.path.getsize(path) == 0:
        die(f"{path} is empty: it needs stories, each followed by a line {STORY_SEPARATOR}")


def read_chunks(path, size=None):
    """The text of a TinyStories-layout file in ~size pieces, each ending just after a
    separator (or at the end of the file), so no story is cut and RAM stays flat.

    Dies on a missing or empty file, invalid UTF-8 and a file with no stories.
    """
    check_file(path)
    size = size or STORY_CHUNK
    sep = STORY_SEPARATOR.encode()
    buf, offset, has_story = bytearray(), 0, False
    try:
        f = open(path, 'rb')
    except OSError as e:
        die(f"cannot read {path} ({e.strerror}): check the path and its permissions")
    with f:
        while True:
            block = f.read(size)
            search_from = max(0, len(buf) - len(sep) + 1)  # only the new bytes can hold a new separator
            buf += block
            if block:
                cut = buf.rfind(sep, search_from)
                if cut < 0:
                    continue  # a story longer than a block: read on
                cut += len(sep)
            else:
                cut = len(buf)  # the end: whatever follows the last separator is a story too
            try:
                text = buf[:cut].decode('utf-8')  # a cut after ASCII never splits a character
            except UnicodeDecodeError as e:
                die(f"{path} is not valid UTF-8 (bad byte at offset {offset + e.start}): convert it to UTF-8 text")
            if offset == 0:
                text = text.removeprefix('\ufeff')  # a byte-order mark is not part of the story
            del buf[:cut]
            offset += cut
            has_story = has_story or bool(text.replace(STORY_SEPARATOR, '').strip())
            if text:
                yield text
            if not block:
                break
    if not has_story:
        die(f"{path} holds no stories (only whitespace and {STORY_SEPARATOR} lines): "
            f"it needs text, each story followed by a line {STORY_SEPARATOR}")


def split_stories(text):
    """The stripped, non-empty stories in a piece of TinyStories-layout text."""
    return [s for s in (story.strip() for story in text.split(STORY_SEPARATOR)) if s]


def read_stories(path):
    """The stripped stories of one TinyStories-layout file, as a list; dies clearly on bad input."""
    return [story for text in read_chunks(path) for story in split_stories(text)]


def encode_stories(stories):
    """GPT-2 tokens of each story followed by EOT (50256), as one np.uint16 array.

    Same tokens as enc.encode_ordinary(story) + [EOT] per story, made in one tiktoken call:
    joined by the separator and encoded with only EOT allowed as special, each story is
    encoded on its own. ~8% faster than a call per story, and no Python list of ints.
    """
    enc = get_tokenizer()
    text = STORY_SEPARATOR.join(stories) + STORY_SEPARATOR
    if stories and text.count(STORY_SEPARATOR) == len(stories):  # no story holds the separator itself
        try:
            return enc.encode_to_numpy(text, allowed_special={STORY_SEPARATOR}).astype(np.uint16)
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary below replaces them
            pass
    ids = [t for story in stories for t in enc.encode_ordinary(story) + [EOT_TOKEN]]
    return np.array(ids, dtype=np.uint16)


# -----------------------------------------------------------------------------
# tokenized data: data_dir/{train,val}.bin (uint16 memmaps) described by meta.json

def read_meta(data_dir):
    """data_dir/meta.json (prepare.py writes it last, so it means "complete") as a dict, None
    if there is none; one line and a stop if it is unreadable. The one reader of meta.json."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path} is unreadable ({type(e).__name__}: {e}): re-run `python prepare.py --force`")
    if not isinstance(meta, dict):
        die(f"{path} is not a prepare.py meta.json: re-run `python prepare.py --force`")
    return meta


def load_meta(data_dir):
    """read_meta for data the run needs: a missing meta.json stops with the fix."""
    if os.path.isfile(data_dir):
        die(f"{data_dir} is a file, not a folder: pass --data_dir=FOLDER holding train.bin, val.bin and meta.json")
    meta = read_meta(data_dir)
    if meta is None:
        die(f"{os.path.join(data_dir, 'meta.json')} not found: run `python prepare.py` (or pass "
            f"--data_dir=FOLDER holding train.bin, val.bin and meta.json)")
    return meta


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


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 folders: the layout export.py writes, read back here so that every script
# takes one wherever it takes a checkpoint

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')  # HF stores these transposed


def gpt2_shapes(model_args, bias):
    """Every tensor of a GPT-2-shaped model in our layout (nn.Linear: (out, in)), name -> shape."""
    V, T, C = model_args['vocab_size'], model_args['block_size'], model_args['n_embd']
    shapes = {'transformer.wte.weight': (V, C), 'transformer.wpe.weight': (T, C),
              'transformer.ln_f.weight': (C,), 'lm_head.weight': (V, C)}
    for i in range(model_args['n_layer']):
        h = f'transformer.h.{i}.'
        shapes.update({h + 'ln_1.weight': (C,), h + 'attn.c_attn.weight': (3 * C, C),
                       h + 'attn.c_proj.weight': (C, C), h + 'ln_2.weight': (C,),
                       h + 'mlp.c_fc.weight': (4 * C, C), h + 'mlp.c_proj.weight': (C, 4 * C)})
    if bias:
        for name, shape in list(shapes.items()):
            if name.endswith('.weight') and 'wte' not in name and 'wpe' not in name and name != 'lm_head.weight':
                shapes[name[:-len('weight')] + 'bias'] = shape[:1]
    return shapes


def check_gpt2_shaped(state_dict, model_args, bias, source):
    """Die with one line unless state_dict holds exactly the tensors of a GPT-2 of these sizes."""
    try:
        expected = gpt2_shapes(model_args, bias)
    except (KeyError, TypeError) as e:
        die(f"{source} is not GPT-2-shaped: its model sizes are incomplete ({type(e).__name__}: {e})")
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        die(f"{source} is not GPT-2-shaped: missing tensors {missing[:3]}, unexpected tensors {extra[:3]}"
            f"{' ...' if len(missing) > 3 or len(extra) > 3 else ''}; SLM handles GPT-2-layout models only")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            die(f"{source} is not GPT-2-shaped: {name} has shape {tuple(state_dict[name].shape)}, "
                f"expected {shape} from its config")
    if model_args['n_embd'] % model_args['n_head']:
        die(f"{source} is not GPT-2-shaped: n_embd={model_args['n_embd']} is not divisible by n_head={model_args['n_head']}")
    if not state_dict['lm_head.weight'].equal(state_dict['transformer.wte.weight']):
        die(f"{source} has an output layer that is not tied to the token embedding; GPT-2 ties them")


TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def read_hf_tensors(folder):
    """All tensors of an HF folder: model.safetensors (single or sharded) or pytorch_model.bin."""
    import torch
    st, index, pt = (os.path.join(folder, n) for n in
                     ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin'))
    try:
        if os.path.isfile(st) or os.path.isfile(index):
            from safetensors.torch import load_file
            if os.path.isfile(st):
                return load_file(st)
            with open(index) as f:
                files = sorted(set(json.load(f)['weight_map'].values()))
            return {k: v for name in files for k, v in load_file(os.path.join(folder, name)).items()}
        if os.path.isfile(pt):
            return torch.load(pt, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f"could not read the weights in {folder} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"re-export or re-download the folder")
    die(f"{folder} has config.json but no model.safetensors or pytorch_model.bin: re-export or re-download it")


def load_hf_folder(folder):
    """Read a GPT-2-shaped Hugging Face folder into an SLM checkpoint dict {'model', 'model_args'}."""
    try:
        with open(os.path.join(folder, 'config.json')) as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        die(f"{folder}/config.json is unreadable ({type(e).__name__}); re-export or re-download the folder")
    arch = c.get('architectures') or []
    if c.get('model_type') != 'gpt2' or not all(x in ('GPT2LMHeadModel', 'GPT2Model') for x in arch):
        die(f"{folder} holds a {c.get('model_type')!r} model ({', '.join(arch) or 'no architecture'}); "
            f"SLM reads GPT-2-shaped models only (model_type 'gpt2', GPT2LMHeadModel)")
    act = c.get('activation_function', 'gelu_new')
    unsupported = [f"{k}={c.get(k)}" for k, ok in (
        ('activation_function', act == 'gelu' or act in TANH_GELUS),
        ('layer_norm_epsilon', c.get('layer_norm_epsilon', 1e-5) == 1e-5),
        ('n_inner', c.get('n_inner') in (None, 4 * c.get('n_embd', 0))),
        ('scale_attn_weights', c.get('scale_attn_weights', True) is True),
        ('scale_attn_by_inverse_layer_idx', not c.get('scale_attn_by_inverse_layer_idx', False)),
        ('add_cross_attention', not c.get('add_cross_attention', False)),
        ('tie_word_embeddings', c.get('tie_word_embeddings', True) is not False)) if not ok]
    if unsupported:
        die(f"{folder} is not GPT-2-shaped the way SLM's model is: {', '.join(unsupported)} unsupported")
    if act != 'gelu':  # OpenAI's GPT-2 uses the tanh approximation: close, not bit-equal
        print(f"note: {folder} uses activation {act} (tanh-approximate GELU); SLM's exact GELU gives "
              f"slightly different logits (~1e-3)", file=sys.stderr)
    try:
        a = {'vocab_size': int(c['vocab_size']), 'block_size': int(c['n_positions']), 'n_layer': int(c['n_layer']),
             'n_head': int(c['n_head']), 'n_embd': int(c['n_embd']), 'dropout': float(c.get('resid_pdrop', 0.1)),
             'bias': True}
    except (KeyError, TypeError, ValueError) as e:
        die(f"{folder}/config.json lacks a GPT-2 size ({type(e).__name__}: {e}); re-export or re-download it")

    state_dict = {}
    for name, t in read_hf_tensors(folder).items():
        name = name.removeprefix('transformer.')
        if name.split('.')[-2:] in (['attn', 'bias'], ['attn', 'masked_bias']):
            continue  # causal-mask buffers that older transformers versions saved, not weights
        if name == 'lm_head.weight':
            continue  # tied: HF reads the output layer from wte too
        name = 'transformer.' + name
        if name.endswith(CONV1D) and t.dim() == 2:
            t = t.t()
        state_dict[name] = t.float().contiguous()
    if 'transformer.wte.weight' in state_dict:
        state_dict['lm_head.weight'] = state_dict['transformer.wte.weight']  # one tensor, as in our model
    check_gpt2_shaped(state_dict, a, True, folder)

    slm = c.get('slm_model_args') or {}
    a['dropout'] = float(slm.get('dropout', a['dropout']))
    biases = [k for k in state_dict if k.endswith('.bias')]
    if slm.get('bias') is False and all(not state_dict[k].any() for k in biases):
        a['bias'] = False  # written by our export of a bias-free model: give that model back
        for k in biases:
            del state_dict[k]
    return {'model': state_dict, 'model_args': a}


def read_checkpoint(path, map_location='cpu'):
    import torch
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')):
        return load_hf_folder(path)  # a Hugging Face GPT-2 folder (export.py writes these)
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


def load_weights(model, state_dict, source):
    """model.load_state_dict of a checkpoint's weights (torch.compile/DDP prefixes stripped);
    weights that do not fit the model stop with one line."""
    try:
        model.load_state_dict(clean_state_dict(state_dict))
    except RuntimeError as e:
        detail = ' '.join(line.strip() for line in str(e).splitlines()[1:])[:300] or str(e)
        die(f"checkpoint {source} does not match model.py's GPT: {detail}")


def load_model(path, device='cpu'):
    """Build the GPT stored in a checkpoint file; returns (model, checkpoint dict)."""
    from model import GPT, GPTConfig
    ckpt = read_checkpoint(path)
    try:
        model = GPT(GPTConfig(**ckpt['model_args']), verbose=False)
    except TypeError as e:
        die(f"checkpoint {path} does not match model.py's GPT: {e}")
    load_weights(model, ckpt['model'], path)
    return model.to(device), ckpt


GPT2_HUB = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # OpenAI's GPT-2 sizes: 124M, 350M, 774M, 1.5B


def download_gpt2(name):
    """OpenAI's GPT-2 of that size from the Hugging Face hub (openai-community/NAME), into the
    hub's usual cache (~/.cache/huggingface, or HF_HOME): the local folder, for load_hf_folder.
    huggingface_hub comes with datasets. Offline and not cached: one line naming the fix."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(f'openai-community/{name}', allow_patterns=['config.json', 'model.safetensors'])
    except Exception as e:  # no network, no such file, hub errors: all end the same way
        die(f"could not download {name} from the Hugging Face hub ({type(e).__name__}; offline?): pass "
            f"--init_from=FOLDER, a local GPT-2 folder (saved by save_pretrained, or by export.py)")
