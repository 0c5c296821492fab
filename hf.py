"""
Hugging Face GPT-2 folders, both directions: SLM's GPT is GPT-2-shaped, so a folder holds our
weights renamed (HF's Conv1D matrices transposed). Import reads any GPT-2-shaped folder (ours, one
saved by transformers, OpenAI's GPT-2 from the hub); checkpoints.read_checkpoint calls it for
folders. Export writes the weights, config.json, the tokenizer files and a model card (export.py).
"""
import json
import os
import sys

from common import die, die_if_disk_full
from data import EOT_TEXT, EOT_TOKEN, gpt2_tokenizer_files
from runlog import read_log

# -----------------------------------------------------------------------------
# the layout: a GPT-2's tensors under our names, and HF's differences from it

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


# -----------------------------------------------------------------------------
# import: HF folder -> our checkpoint layout

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


# -----------------------------------------------------------------------------
# export: our checkpoint -> HF folder

def to_hf_tensors(state_dict, model_args):
    """Our tensors in HF GPT2LMHeadModel naming: Conv1D stores (in, out), so its four matrices are
    transposed; lm_head is left out (tied to wte); a bias-free model gets exact zero biases."""
    import torch
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
    """config.json: HF's GPT-2 settings under which its forward is ours, and our model_args."""
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
    """README.md: the model's sizes, its training record (checkpoint and run log) and how to load it."""
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
    """The export's files into folder, from checkpoint: its model_args complete and its weights
    under model.py's names (export.py's export fills the one and cleans the other). shown: the
    folder a full-disk error names (the export's place; folder is its temp name), so the one line
    says which file did not fit."""
    from safetensors.torch import save_file
    state_dict = checkpoint['model']
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
