"""
Text and tokens: the GPT-2 tokenizer (tiktoken's, and the same BPE as Hugging Face's vocab.json
and merges.txt), story text files in the TinyStories layout, and the tokenized data on disk
(data_dir/{train,val}.bin with their meta.json).
"""
import json
import os
from functools import lru_cache

import numpy as np

from common import die

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, appended after every story
EOT_TEXT = '<|endoftext|>'  # its text


# -----------------------------------------------------------------------------
# tokenizer: GPT-2's BPE through tiktoken; for a Hugging Face folder the same BPE as vocab.json and
# merges.txt, rebuilt from tiktoken's byte-pair ranks (no download)

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
    (sample.py prints them). A character can span tokens, so bytes are
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


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # whitespace and control bytes get shifted past 255
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def gpt2_tokenizer_files():
    """(vocab dict, merges list) of the GPT-2 BPE, from tiktoken (works offline with TIKTOKEN_CACHE_DIR):
    what vocab.json and merges.txt hold in a Hugging Face GPT-2 folder (hf.write_folder writes them).

    tiktoken only stores each token's rank, and rank order is merge order. The merge that made
    token r is found by running BPE on its bytes with only ranks below r: that stops at the two
    parts merged last.
    """
    enc = get_tokenizer()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_TOKEN)}
    byte_char = bytes_to_unicode()

    def as_text(token):
        return ''.join(byte_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best_rank, i = min(pairs)
            if best_rank >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2 or ranks.get(parts[0] + parts[1]) != rank:
            die(f"could not rebuild the GPT-2 merge for token {rank}: the tiktoken files look corrupt; {token!r}")
        merges.append(f"{as_text(parts[0])} {as_text(parts[1])}")
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT_TOKEN
    return vocab, merges


# -----------------------------------------------------------------------------
# stories: TinyStories-layout text files (each story followed by a line <|endoftext|>)

STORY_SEPARATOR = EOT_TEXT  # the line after every story
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


def open_splits(data_dir, vocab_size, block_size):
    """train.py's train and val token memmaps, read-only, each longer than a window."""
    splits = {split: open_split(data_dir, split, vocab_size) for split in ('train', 'val')}
    for split, data in splits.items():
        if len(data) <= block_size:
            die(f"{data_dir}/{split}.bin holds {len(data)} tokens, fewer than block_size+1="
                f"{block_size + 1}: prepare more text or lower --block_size")
    return splits


def vocab_size_of(data_dir, model_vocab=None, model_dir=None):
    """train.py's vocabulary: meta.json's for a new model; else model_vocab, the vocabulary of
    the checkpoint in model_dir (a resume's or a fine-tune's), which must cover the data's tokens."""
    meta_vocab = load_meta(data_dir).get('vocab_size')
    if not isinstance(meta_vocab, int) or meta_vocab < 1:
        die(f"{data_dir}/meta.json has no valid vocab_size: re-run `python prepare.py --force`")
    if model_vocab is None:
        return meta_vocab
    if meta_vocab > model_vocab:
        die(f"{data_dir}/meta.json describes a {meta_vocab}-token vocabulary, but the checkpoint in "
            f"{model_dir} has {model_vocab}: train on data tokenized for that model (--data_dir)")
    return model_vocab


def get_batch(data, batch_size, block_size, generator, device):
    """batch_size random windows of the token memmap: inputs x and next-token targets y (train.py's
    batches; torch is imported here alone, so prepare.py's tokenizer processes never load it)."""
    import torch
    if isinstance(data, np.memmap):
        # through a fresh mapping each time: pages read through one long-lived mapping stay in
        # the process's RSS, which grows toward the file's size over a long run (nanoGPT #287)
        data = np.memmap(data.filename, dtype=data.dtype, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    windows = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if device.startswith('cuda'):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
