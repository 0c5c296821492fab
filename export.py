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

The reverse direction, load_hf_folder(folder), reads any GPT-2-shaped HF folder (ours, or e.g.
openai-community/gpt2 downloaded by you) into our checkpoint layout; common.read_checkpoint calls
it for folders, so `python sample.py --ckpt=<hf folder>` works.
"""
import json
import os
import shutil
import sys
from dataclasses import asdict
from functools import lru_cache

import torch

from common import (EOT_TOKEN, check_writable, clean_state_dict, config_defaults, die, get_tokenizer, parse_config,
                    read_checkpoint)
from model import GPTConfig

# -----------------------------------------------------------------------------
# config
ckpt = 'out/best_model_params.pt'  # any SLM checkpoint: a dict with 'model' and 'model_args'
out = 'export/slm-hf'              # folder to write; must not exist or be empty, unless --force
force = False                      # replace an existing export folder at --out
# -----------------------------------------------------------------------------

GPT2_VOCAB = 50257                 # the GPT-2 BPE: 50256 merged byte strings + <|endoftext|>
EOT_TEXT = '<|endoftext|>'
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
MODEL_ARGS = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'bias')


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
            f"{' ...' if len(missing) > 3 or len(extra) > 3 else ''}; export.py handles GPT-2-layout models only")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            die(f"{source} is not GPT-2-shaped: {name} has shape {tuple(state_dict[name].shape)}, "
                f"expected {shape} from its config")
    if model_args['n_embd'] % model_args['n_head']:
        die(f"{source} is not GPT-2-shaped: n_embd={model_args['n_embd']} is not divisible by n_head={model_args['n_head']}")
    if not torch.equal(state_dict['lm_head.weight'], state_dict['transformer.wte.weight']):
        die(f"{source} has an output layer that is not tied to the token embedding; GPT-2 ties them")


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
        'activation_function': 'gelu',  # exact erf GELU = our nn.GELU() ('gelu_new' is GPT-2's tanh one)
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


def read_log(out_dir):
    """The eval rows of out_dir/log.jsonl (skipping unreadable lines), or []."""
    rows = []
    try:
        with open(os.path.join(out_dir, 'log.jsonl')) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return [r for r in rows if isinstance(r, dict) and 'iter' in r]


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
    rows = read_log(os.path.dirname(os.path.abspath(ckpt_path))) if os.path.isfile(ckpt_path) else []
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


def write_folder(folder, checkpoint, ckpt_path):
    from safetensors.torch import save_file
    state_dict = clean_state_dict(checkpoint['model'])
    a = dict(checkpoint['model_args'])
    tensors = to_hf_tensors(state_dict, a)
    dtype = tensors['transformer.wte.weight'].dtype
    weights = os.path.join(folder, 'model.safetensors')
    save_file(tensors, weights, metadata={'format': 'pt'})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates it owner-only; give it the usual file mode
    n_params = sum(t.numel() for t in state_dict.values()) - state_dict['lm_head.weight'].numel()

    def dump(obj, name, indent=2):
        with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)

    dump(hf_config(a, dtype), 'config.json')
    # sample.py-style sampling; pad = eos because GPT-2 has no pad token
    dump({'bos_token_id': EOT_TOKEN, 'eos_token_id': EOT_TOKEN, 'pad_token_id': EOT_TOKEN,
          'do_sample': True, 'temperature': 0.8, 'top_k': 200},
         'generation_config.json')
    vocab, merges = gpt2_tokenizer_files()
    dump(vocab, 'vocab.json', indent=None)
    with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    dump({'tokenizer_class': 'GPT2Tokenizer', 'bos_token': EOT_TEXT, 'eos_token': EOT_TEXT,
          'unk_token': EOT_TEXT, 'add_prefix_space': False, 'model_max_length': a['block_size']},
         'tokenizer_config.json')
    with open(os.path.join(folder, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(model_card(checkpoint, ckpt_path, n_params))


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
        write_folder(tmp, {**checkpoint, 'model_args': a}, ckpt_path)
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

TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def read_hf_tensors(folder):
    """All tensors of an HF folder: model.safetensors (single or sharded) or pytorch_model.bin."""
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
