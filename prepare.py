"""
Tokenize TinyStories once into uint16 memmaps that train.py streams from disk.

    python prepare.py                      # download roneneldan/TinyStories from the HF hub
    python prepare.py --train_files=A.txt,B.txt --val_files=C.txt --out_dir=DIR   # local files

Local files use the TinyStories text layout: each story followed by a line <|endoftext|>;
with them (and TIKTOKEN_CACHE_DIR holding the GPT-2 BPE files) no internet is needed.
Every story is stripped, encoded with GPT-2's BPE (tiktoken) and followed by the EOT token
50256, so the model learns where a story ends. Writes out_dir/train.bin, val.bin and
meta.json (token and story counts, text bytes, sha256 per split, sources).

Tokenizing runs in one process per CPU core (tiktoken's own threads do not scale here) and
streams tokens to disk as they come, so RAM stays flat however big the corpus. Outputs are
written under temp names and renamed at the end, meta.json last: it marks a complete run.
"""
import glob
import hashlib
import os
import signal
import socket
import threading
import time
import urllib.parse
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from common import check_writable, config_defaults, die, die_if_disk_full, parse_config, save_json
from data import EOT_TOKEN, check_file, encode_stories, get_tokenizer, read_chunks, read_meta, split_stories
from device import cpu_count

# -----------------------------------------------------------------------------
# config (python prepare.py --key=value)
out_dir = 'data/tinystories'  # writes train.bin, val.bin and meta.json here
dataset = 'roneneldan/TinyStories'  # Hugging Face dataset (or local folder) used without --train_files
train_files = ''  # comma-separated local text files in the TinyStories layout ...
val_files = ''    # ... give both to prepare offline or from your own stories
force = False     # rebuild even if out_dir already holds a complete run
num_proc = 0      # tokenizer processes; 0 = one per CPU core, at most 4 per core
# -----------------------------------------------------------------------------

_HUB_SPLITS = {'train': 'train', 'val': 'validation'}  # our split name -> the hub's
_BATCH = 256      # hub stories per task
_ROUTES = ("to prepare offline, tokenize local files in the TinyStories layout: python prepare.py "
           "--train_files=TRAIN.txt --val_files=VAL.txt (e.g. ../shared/data/tinystories/train.txt and "
           "validation.txt), with TIKTOKEN_CACHE_DIR set to a folder holding the GPT-2 BPE files "
           "(e.g. ../shared/tiktoken-cache)")


# -----------------------------------------------------------------------------
# worker tasks: GPT-2 BPE (data.encode_stories), EOT after every story

def _encode_batch(stories):
    """Worker task: (tokens, UTF-8 bytes of text, number of stories) of a list of stories."""
    return encode_stories(stories), sum(len(s.encode('utf-8')) for s in stories), len(stories)


def _encode_text(text):
    """Worker task: _encode_batch of a piece of a file, split here so the main process only reads."""
    return _encode_batch(split_stories(text))


def _init_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    # A worker waits on the task queue forever if the main process is killed (kill -9, the OOM
    # killer). Its parent (whatever the start method made it) going away re-parents the worker,
    # so a new parent pid means: exit.
    parent = os.getppid()

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=exit_when_orphaned, daemon=True).start()


def tokenize(encode, tasks, pool, workers):
    """encode(task) for each task in the pool's workers (or here if pool is None),
    yielding the results in order.

    At most a few tasks per worker are in flight: Pool.imap or Executor.map would read the
    whole input ahead of the workers and hold it all in RAM.
    """
    if pool is None:
        yield from map(encode, tasks)
        return
    pending, ahead = deque(), 4 * workers
    for task in tasks:
        pending.append(pool.submit(encode, task))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -----------------------------------------------------------------------------
# writing: tokens streamed into temp files, renamed into place at the end

def write_split(name, results, path, total=None):
    """Stream (tokens, text_bytes, stories) results into path; returns the split's meta entry."""
    sha = hashlib.sha256()
    stories = tokens = text_bytes = 0
    t0 = last = time.perf_counter()
    try:
        with open(path, 'wb') as f:
            for ids, nbytes, n in results:
                f.write(ids)
                sha.update(ids)
                stories, tokens, text_bytes = stories + n, tokens + len(ids), text_bytes + nbytes
                now = time.perf_counter()
                if now - last > 5:
                    last, dt = now, now - t0
                    done = f"{stories:,}/{total:,}" if total else f"{stories:,}"
                    print(f"{name}: {done} stories, {tokens / 1e6:.1f}M tokens, {text_bytes / 1e6:.0f} MB | "
                          f"{stories / dt:,.0f} stories/s, {tokens / dt / 1e6:.2f}M tokens/s, "
                          f"{text_bytes / dt / 1e6:.1f} MB/s", flush=True)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: one line naming the bin (not its temp name)
        die_if_disk_full(e, os.path.join(os.path.dirname(path), f"{name}.bin"))
        raise
    dt = time.perf_counter() - t0
    print(f"{name}: {stories:,} stories, {tokens:,} tokens, {text_bytes / 1e6:.1f} MB of text "
          f"in {dt:.1f} s ({text_bytes / dt / 1e6:.1f} MB/s)", flush=True)
    return {'file': f"{name}.bin", 'tokens': tokens, 'stories': stories, 'text_bytes': text_bytes,
            'sha256': sha.hexdigest()}


def complete_meta(out_dir):
    """meta.json of a finished run whose bins have the sizes it records, else None."""
    meta = read_meta(out_dir)
    try:
        splits = meta['splits'].values()
        if all(os.path.getsize(os.path.join(out_dir, s['file'])) == 2 * s['tokens'] for s in splits):
            return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def already_prepared(out_dir, sources, force):
    """True (after saying so) when out_dir already holds a complete run from these sources."""
    meta = None if force else complete_meta(out_dir)
    if meta is None:
        return False
    if meta.get('sources') != sources:
        die(f"{out_dir} already holds data prepared from other sources ({_listed(meta.get('sources'))}): "
            f"pass --force to replace it, or choose another --out_dir")
    tokens = sum(s['tokens'] for s in meta['splits'].values())
    print(f"{out_dir} is already prepared ({tokens:,} tokens from {_listed(sources)}); "
          f"nothing to do (--force rebuilds it)")
    return True


def _listed(sources):
    try:
        return ', '.join(f"{split}: {path}" for split, paths in sources.items() for path in paths)
    except (AttributeError, TypeError, ValueError):
        return repr(sources)


def write_dataset(out_dir, split_tasks, sources, num_proc=0):
    """Tokenize {split: (encode, tasks, total stories or None)} into out_dir; returns meta.

    Bins are written under temp names; on success meta.json is removed, the bins renamed
    into place and meta.json written last, so an interrupted run never looks complete.
    """
    get_tokenizer()  # fails here in one line, not in every worker; forked workers inherit it
    made, missing = [], os.path.abspath(out_dir)  # folders this run makes: a failed run removes them
    while not os.path.exists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create out_dir {out_dir} ({e.strerror}): choose a writable --out_dir")
    for stale in glob.glob(os.path.join(out_dir, '*.tmp[0-9]*')):  # left by a killed run
        os.remove(stale)
        print(f"removed {stale}, left by an interrupted run")
    meta_path = os.path.join(out_dir, 'meta.json')
    tmp = {split: os.path.join(out_dir, f"{split}.bin.tmp{os.getpid()}") for split in split_tasks}
    t0 = time.perf_counter()
    if num_proc <= 0:
        num_proc = cpu_count()
    pool = ProcessPoolExecutor(num_proc, initializer=_init_worker) if num_proc > 1 else None
    meta = None
    try:
        splits = {split: write_split(split, tokenize(encode, tasks, pool, num_proc), tmp[split], total)
                  for split, (encode, tasks, total) in split_tasks.items()}
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for split in splits:
            os.replace(tmp[split], os.path.join(out_dir, f"{split}.bin"))
        meta = {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_token': EOT_TOKEN, 'dtype': 'uint16',
                'splits': splits, 'sources': sources}
        save_json(meta, meta_path)
    except OSError as e:
        die(f"could not write {e.filename or out_dir} ({e.strerror or e}): "
            f"choose a writable --out_dir with free space")
    except BrokenProcessPool:
        die("a tokenizer process died (out of memory, or killed): run again, with fewer --num_proc")
    finally:
        if pool is not None:  # waits for the tasks already running (each a few stories); never
            pool.shutdown(cancel_futures=True)  # wait=False: its exit-time wakeup races (EBADF)
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        for folder in made if meta is None else []:  # deepest first; rmdir leaves a non-empty one
            try:
                os.rmdir(folder)
            except OSError:
                break
    dt = time.perf_counter() - t0
    stories = sum(s['stories'] for s in splits.values())
    tokens = sum(s['tokens'] for s in splits.values())
    text_mb = sum(s['text_bytes'] for s in splits.values()) / 1e6
    print(f"done: {stories:,} stories, {tokens:,} tokens, {text_mb:.1f} MB of text -> "
          f"{2 * tokens / 1e6:.1f} MB of bins in {out_dir} in {dt:.1f} s ({text_mb / dt:.1f} MB/s)")
    return meta


# -----------------------------------------------------------------------------
# the two sources: local files and the Hugging Face hub

def prepare_files(train_files, val_files, out_dir, force=False, num_proc=0):
    """Tokenize local TinyStories-layout files into out_dir; returns meta (a no-op if done)."""
    files = {'train': list(train_files), 'val': list(val_files)}
    if not files['train'] or not files['val']:
        die("give at least one file to each of --train_files and --val_files (comma-separated)")
    sources = {split: [os.path.abspath(p) for p in paths] for split, paths in files.items()}
    if already_prepared(out_dir, sources, force):
        return complete_meta(out_dir)
    for path in files['train'] + files['val']:
        check_file(path)  # fail before tokenizing anything
    chunks = {split: (text for path in paths for text in read_chunks(path)) for split, paths in files.items()}
    return write_dataset(out_dir, {split: (_encode_text, c, None) for split, c in chunks.items()},
                         sources, num_proc)


def hub_reachable(timeout=3.0):
    """A quick TCP probe of the hub: load_dataset itself retries for ~25 s when offline."""
    if any(os.environ.get(k) for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
        return True  # behind a proxy a direct probe says nothing; let datasets try
    url = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(name):
    """{'train': Dataset, 'val': Dataset} from the hub, or from the local HF cache when offline."""
    offline = any(os.environ.get(k, '').upper() in ('1', 'ON', 'YES', 'TRUE')
                  for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'))
    if not offline and not os.path.isdir(name) and not hub_reachable():
        offline = True
        os.environ['HF_HUB_OFFLINE'] = '1'  # serve from the local cache only (read on import)
    try:
        import datasets
    except ImportError:
        die(f"the Hugging Face datasets package is missing: pip install datasets; or {_ROUTES}")
    if offline:
        datasets.config.HF_HUB_OFFLINE = True  # in case datasets was imported before
    try:
        return {split: datasets.load_dataset(name, split=hub_split) for split, hub_split in _HUB_SPLITS.items()}
    except Exception as e:
        if offline:
            die(f"cannot reach the Hugging Face hub and {name} is not in the local cache; {_ROUTES}")
        die(f"could not load {name} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); {_ROUTES}")


def _hub_batches(ds):
    for rows in ds.iter(batch_size=_BATCH):
        yield [s for s in (text.strip() for text in rows['text'] if text) if s]


def prepare_hub(name, out_dir, force=False, num_proc=0):
    """Download a TinyStories-style hub dataset (a 'text' column) and tokenize it into out_dir."""
    local = os.path.isdir(name)
    sources = {split: [f"hf:{os.path.abspath(name) if local else name}:{hub_split}"]
               for split, hub_split in _HUB_SPLITS.items()}
    if already_prepared(out_dir, sources, force):
        return complete_meta(out_dir)
    data = load_hub(name)
    for split, ds in data.items():
        if 'text' not in ds.column_names:
            die(f"dataset {name} ({split}) has no 'text' column (it has {ds.column_names}): "
                f"use a TinyStories-style dataset or --train_files/--val_files")
    return write_dataset(out_dir, {split: (_encode_batch, _hub_batches(ds), len(ds)) for split, ds in data.items()},
                         sources, num_proc)


def file_list(value):
    return [p for p in value.split(',') if p]


def check_config(cfg):
    """Stop with one line on a bad flag before any work: nothing loaded, read or written yet."""
    most = 4 * cpu_count()  # more only adds memory: each worker holds the BPE and its tasks
    if not 0 <= cfg['num_proc'] <= most:
        die(f"--num_proc={cfg['num_proc']} is out of range: use 1 to {most} tokenizer processes "
            f"({cpu_count()} CPU cores here), or 0 for one per core")
    if bool(cfg['train_files']) != bool(cfg['val_files']):
        die("give both --train_files and --val_files (comma-separated text files), "
            "or neither to download TinyStories")
    if cfg['train_files']:
        train, val = file_list(cfg['train_files']), file_list(cfg['val_files'])
        if not train or not val:
            die("give at least one file to each of --train_files and --val_files (comma-separated)")
        for path in train + val:
            check_file(path)
    elif not cfg['dataset'].strip():
        die("--dataset is empty: pass a Hugging Face dataset name (like roneneldan/TinyStories) or a dataset folder")
    elif os.path.isfile(cfg['dataset']):
        die(f"--dataset={cfg['dataset']} is a file, not a dataset: pass a Hugging Face dataset name or folder, "
            f"or text files with --train_files/--val_files")
    if not cfg['out_dir']:
        die("--out_dir is empty: pass the folder for train.bin, val.bin and meta.json")
    if cfg['force'] or complete_meta(cfg['out_dir']) is None:  # an up-to-date read-only folder is fine
        check_writable(cfg['out_dir'], '--out_dir')


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, script=__file__)
    check_config(cfg)
    try:
        if cfg['train_files']:
            prepare_files(file_list(cfg['train_files']), file_list(cfg['val_files']),
                          cfg['out_dir'], cfg['force'], cfg['num_proc'])
        else:
            prepare_hub(cfg['dataset'], cfg['out_dir'], cfg['force'], cfg['num_proc'])
    except KeyboardInterrupt:
        die("interrupted: temp files removed, no new meta.json written; run again to prepare")


if __name__ == '__main__':
    main()
