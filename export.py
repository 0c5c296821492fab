"""
Export an SLM checkpoint as a Hugging Face GPT-2 folder, and read such folders back.

    python export.py --ckpt=out/best_model_params.pt --out=export/slm-hf [--force]

The folder loads with transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(folder),
no network needed, and gives the same logits as our model: SLM *is* GPT-2-shaped (pre-LN blocks,
exact-GELU MLP, tied embeddings, LayerNorm eps 1e-5), so the export is a renaming plus a transpose.
It holds config.json, model.safetensors, generation_config.json, the GPT-2 tokenizer files
(vocab.json and merges.txt, rebuilt from tiktoken's ranks so no download is needed),
tokenizer_config.json and a README.md model card.

bias=False models are exported exactly: a missing bias is the same function as a zero bias, so
zeros are written (HF's GPT-2 always has biases) and config.json notes slm_model_args.bias=false
so that importing the folder gives the bias-free model back.

The reverse direction, common.load_hf_folder(folder), reads any GPT-2-shaped HF folder (ours, or
e.g. openai-community/gpt2 downloaded by you) into our checkpoint layout; common.read_checkpoint
calls it for folders, so `python sample.py --ckpt=<hf folder>` works.
"""
import json
import os
import shutil
from dataclasses import asdict, fields
from functools import lru_cache

import torch

from common import (CONV1D, EOT_TOKEN, check_gpt2_shaped, check_writable, clean_state_dict, config_defaults, die,
                    die_if_disk_full, get_tokenizer, gpt2_shapes, parse_config, read_checkpoint, read_log)
from model import GPTConfig

# -----------------------------------------------------------------------------
# config
ckpt = 'out/best_model_params.pt'  # any SLM checkpoint: a dict with 'model' and 'model_args'
out = 'export/slm-hf'              # folder to write; must not exist or be empty, unless --force
force = False                      # replace an existing export folder at --out
# -----------------------------------------------------------------------------

GPT2_VOCAB = 50257                 # the GPT-2 BPE: 50256 merged byte strings + <|endoftext|>
EOT_TEXT = '<|endoftext|>'
MODEL_ARGS = tuple(f.name for f in fields(GPTConfig))  # what a checkpoint's model_args may hold


# -----------------------------------------------------------------------------
# tokenizer: GPT-2's vocab.json / merges.txt rebuilt from tiktoken's byte-pair ranks

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
    """(vocab dict, merges list) of the GPT-2 BPE, from tiktoken (works offline with TIKTOKEN_CACHE_DIR).

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
# export: our checkpoint -> HF folder

def to_hf_tensors(state_dict, model_args):
    """Our tensors in HF GPT2LMHeadModel naming: Conv1D stores (in, out), so its four matrices are
    transposed; lm_head is left out (tied to wte); a bias-free model gets exact zero biases."""
    tensors = {}
    for name, shape in gpt2_shapes(model_args, bias=True).items():
        if name == 'lm_head.weight':
            continue
        if name in state_dict:
            t = state_dict[name]
        else:  # bias=False: no bias is the same function as a zero bias
            t = torch.zeros(shape, dtype=state_dict['transformer.wte.weight'].dtype)
        if name.endswith(CONV1D):
            t = t.t()
        tensors[name] = t.detach().cpu().contiguous()
    return tensors


def hf_config(model_args, dtype):
    d = model_args['dropout']
    return {
        'architectures': ['GPT2LMHeadModel'],
        'model_type': 'gpt2',
        'vocab_size': model_args['vocab_size'],
        'n_positions': model_args['block_size'],
        'n_embd': model_args['n_embd'],
        'n_layer': model_args['n_layer'],
        'n_head': model_args['n_head'],
        'n_inner': None,  # 4 * n_embd, as ours
        'activation_function': 'gelu',  # exact erf GELU, as our F.gelu ('gelu_new' is GPT-2's tanh one)
        'layer_norm_epsilon': 1e-5,  # nn.LayerNorm's default
        'initializer_range': 0.02,
        'resid_pdrop': d, 'embd_pdrop': d, 'attn_pdrop': d,
        'scale_attn_weights': True,
        'scale_attn_by_inverse_layer_idx': False,
        'reorder_and_upcast_attn': False,
        'tie_word_embeddings': True,
        'bos_token_id': EOT_TOKEN,
        'eos_token_id': EOT_TOKEN,
        'use_cache': True,
        'torch_dtype': str(dtype).removeprefix('torch.'),
        'slm_model_args': dict(model_args),  # exact round trip (bias=False) when read back by SLM
    }


def model_card(checkpoint, ckpt_path, n_params):
    a = checkpoint['model_args']
    cfg = checkpoint.get('config') or {}
    lines = ['---', 'library_name: transformers', 'pipeline_tag: text-generation', 'tags: [gpt2, slm, tinystories]', '---',
             f"# SLM GPT ({n_params / 1e6:.2f}M parameters)", '',
             'A small GPT-2-shaped language model from SLM, a minimal PyTorch LLM pipeline that trains '
             'story writers on TinyStories, exported by its export.py. It loads as a standard `GPT2LMHeadModel`; '
             'its logits match the SLM checkpoint it came from (max abs difference < 1e-4 in float32).', '',
             '## Model', '',
             '| n_layer | n_head | n_embd | block_size (context) | vocab_size | dropout | bias |',
             '|---|---|---|---|---|---|---|',
             f"| {a['n_layer']} | {a['n_head']} | {a['n_embd']} | {a['block_size']} | {a['vocab_size']} "
             f"| {a.get('dropout', 0.0)} | {a.get('bias', True)} |", '',
             'Tokenizer: GPT-2 BPE (50257 tokens, `<|endoftext|>` = 50256 ends every story). '
             'Pre-LayerNorm blocks, exact GELU, tied input/output embeddings.', '',
             '## Training data', '']
    data_dir = cfg.get('data_dir')
    lines.append(f"`{data_dir}`: SLM's default is TinyStories (short synthetic children's stories)."
                 if data_dir else "Not recorded in the checkpoint.")
    lines += ['', '## Training', '']
    if 'iter_num' not in checkpoint and 'best_val_loss' not in checkpoint:
        lines.append('The checkpoint carries no training record.')
    if 'iter_num' in checkpoint:
        lines.append(f"- iterations: {checkpoint['iter_num']}")
    if 'best_val_loss' in checkpoint:
        lines.append(f"- best validation loss: {float(checkpoint['best_val_loss']):.4f}")
    for key in ('batch_size', 'gradient_accumulation_steps', 'learning_rate', 'max_iters', 'weight_decay'):
        if key in cfg:
            lines.append(f"- {key}: {cfg[key]}")
    rows = read_log(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), 'log.jsonl'))
    if rows:
        step = max(1, len(rows) // 10)  # at most ~10 rows plus the last one
        shown = rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])
        lines += ['', 'Losses from the run log (log.jsonl):', '', '| iter | tokens | train loss | val loss |', '|---|---|---|---|']
        for r in shown:
            fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else '-'
            lines.append(f"| {r.get('iter')} | {r.get('tokens', '-')} | {fmt(r.get('train_loss'))} | {fmt(r.get('val_loss'))} |")
    lines += ['', '## Use', '', '```python',
              'from transformers import AutoModelForCausalLM, AutoTokenizer',
              'tok = AutoTokenizer.from_pretrained("path/to/this/folder")',
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'ids = tok("Once upon a time", return_tensors="pt").input_ids',
              'print(tok.decode(model.generate(ids, max_new_tokens=100)[0]))',
              '```', '',
              f"The context is {a['block_size']} tokens: prompt plus new tokens must fit in it.", '']
    return '\n'.join(lines)


def write_folder(folder, checkpoint, ckpt_path, shown=None):
    """The export's files into folder. shown: the folder a full-disk error names (the export's
    place; folder is its temp name), so the one line says which file did not fit."""
    from safetensors.torch import save_file
    state_dict = clean_state_dict(checkpoint['model'])
    a = dict(checkpoint['model_args'])
    tensors = to_hf_tensors(state_dict, a)
    dtype = tensors['transformer.wte.weight'].dtype

    def write(name, write_fn):
        try:
            write_fn(os.path.join(folder, name))
        except Exception as e:  # OSError, or safetensors' SafetensorError ("... (os error 28)")
            die_if_disk_full(e, os.path.join(shown or folder, name))
            raise

    def text(name, content):
        def write_text(path):
            with open(path, 'w', encoding='utf-8') as f:
                f.write(content)
        write(name, write_text)

    def dump(obj, name, indent=2):
        text(name, json.dumps(obj, indent=indent, ensure_ascii=False))

    weights = os.path.join(folder, 'model.safetensors')
    write('model.safetensors', lambda path: save_file(tensors, path, metadata={'format': 'pt'}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates it owner-only; give it the usual file mode
    n_params = sum(t.numel() for t in state_dict.values()) - state_dict['lm_head.weight'].numel()

    dump(hf_config(a, dtype), 'config.json')
    # sample.py-style sampling; pad = eos because GPT-2 has no pad token
    dump({'bos_token_id': EOT_TOKEN, 'eos_token_id': EOT_TOKEN, 'pad_token_id': EOT_TOKEN,
          'do_sample': True, 'temperature': 0.8, 'top_k': 200},
         'generation_config.json')
    vocab, merges = gpt2_tokenizer_files()
    dump(vocab, 'vocab.json', indent=None)
    text('merges.txt', '#version: 0.2\n' + '\n'.join(merges) + '\n')
    dump({'tokenizer_class': 'GPT2Tokenizer', 'bos_token': EOT_TEXT, 'eos_token': EOT_TEXT,
          'unk_token': EOT_TEXT, 'add_prefix_space': False, 'model_max_length': a['block_size']},
         'tokenizer_config.json')
    text('README.md', model_card(checkpoint, ckpt_path, n_params))


def check_out(out_path, force=False, ckpt_path=''):
    """Stop, with one line and nothing written, unless out_path can take the export: a new or
    empty folder in a writable place, or with force an earlier export."""
    check_writable(out_path, '--out')
    if os.path.isdir(out_path) and os.listdir(out_path):
        if not force:
            die(f"{out_path} already exists and is not empty: pass --force to replace it, or pick another --out")
        if not os.path.isfile(os.path.join(out_path, 'config.json')):
            die(f"{out_path} does not look like an exported model (no config.json): refusing to replace it "
                f"even with --force; pick another --out")
        if ckpt_path and os.path.abspath(ckpt_path).startswith(os.path.abspath(out_path) + os.sep):
            die(f"the checkpoint {ckpt_path} is inside --out={out_path}: --force would delete it; pick another --out")


def export(checkpoint, out_path, force=False, ckpt_path=''):
    """Write checkpoint (a dict with 'model' and 'model_args') to out_path as an HF GPT-2 folder.

    Written into a temp folder beside out_path and renamed into place, so an interrupted export
    never leaves a complete-looking folder.
    """
    source = ckpt_path or 'the checkpoint'
    a = checkpoint['model_args']
    unknown = sorted(set(a) - set(MODEL_ARGS))
    if unknown:
        die(f"{source} is not GPT-2-shaped: its model_args {unknown} have no GPT-2 counterpart")
    a = {**asdict(GPTConfig()), **a}  # fields left out take model.py's defaults, as load_model does
    state_dict = clean_state_dict(checkpoint['model'])
    check_gpt2_shaped(state_dict, a, a['bias'], source)
    if a['vocab_size'] < GPT2_VOCAB:
        die(f"{source} has vocab_size={a['vocab_size']} < {GPT2_VOCAB}: the exported GPT-2 tokenizer "
            f"would produce ids the model has no embedding for")
    out_path = os.path.normpath(out_path)
    check_out(out_path, force, ckpt_path)
    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    tmp, old = f"{out_path}.tmp{os.getpid()}", f"{out_path}.old.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write_folder(tmp, {**checkpoint, 'model_args': a}, ckpt_path, out_path)
        if os.path.exists(out_path):
            os.rename(out_path, old)
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(out_path):
            os.rename(old, out_path)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_path


# -----------------------------------------------------------------------------
# import: HF GPT-2 folder -> our checkpoint layout

def check_config(cfg):
    """Bad flag values stop here, with one line, before the checkpoint is read."""
    if not cfg['ckpt']:
        die("--ckpt is empty: pass the checkpoint to export, e.g. --ckpt=out/best_model_params.pt")
    if not cfg['out']:
        die("--out is empty: pass the folder to write, e.g. --out=export/slm-hf")
    check_out(os.path.normpath(cfg['out']), cfg['force'], cfg['ckpt'])


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, script=__file__)
    check_config(cfg)
    checkpoint = read_checkpoint(cfg['ckpt'])
    folder = export(checkpoint, cfg['out'], force=cfg['force'], ckpt_path=cfg['ckpt'])
    files = sorted(os.listdir(folder))
    size = os.path.getsize(os.path.join(folder, 'model.safetensors'))
    print(f"exported {cfg['ckpt']} to {folder}/ ({', '.join(files)}; weights {size / 1e6:.1f} MB)")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({folder!r}), "
          f"AutoTokenizer.from_pretrained({folder!r})")


if __name__ == '__main__':
    main()
