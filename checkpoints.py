"""
Where a model comes from: a checkpoint file, SLM's or nanoGPT's (the same layout: {'model':
state_dict, 'model_args': dict, ...}, loaded with weights_only=True), a Hugging Face GPT-2 folder
(read by hf.load_hf_folder into that layout), or OpenAI's GPT-2 by name, downloaded from the hub.
"""
import os
from dataclasses import fields

from common import die
from hf import load_hf_folder
from model import GPTConfig

MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != 'vocab_size']  # a run's shape; vocab: the data's


def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile (_orig_mod.) and DDP (module.) add to keys."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(('_orig_mod.', 'module.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def read_checkpoint(path, map_location='cpu'):
    """The checkpoint dict at path (a file, or a Hugging Face GPT-2 folder); anything unreadable
    stops with one line."""
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
    from model import GPT
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


def finetune_source(cfg, given, log):
    """train.py's fine-tune (--init_from=PATH or a GPT-2 name): the source's weights, and its shape
    into cfg. A shape key set by a flag or config file must agree with the source, except dropout,
    and block_size, which may shrink (the position table is cropped, as nanoGPT's crop_block_size)."""
    source = cfg['init_from']
    ckpt = read_checkpoint(source if os.path.exists(source) else download_gpt2(source))
    theirs = {**{f.name: f.default for f in fields(GPTConfig)}, **ckpt['model_args']}
    for k in MODEL_KEYS:
        if k not in given:
            cfg[k] = theirs[k]
        elif k == 'block_size' and cfg[k] > theirs[k]:
            die(f"block_size={cfg[k]} is larger than {source}'s {theirs[k]} positions: a fine-tune can only "
                f"shrink the context; pass --block_size={theirs[k]} or less")
        elif k not in ('dropout', 'block_size') and cfg[k] != theirs[k]:
            die(f"{k}={cfg[k]} (set by a flag or config file) disagrees with {source}, whose {k} is {theirs[k]}: "
                f"a fine-tune takes the model's shape from its source; drop {k} (only dropout and a smaller "
                f"block_size may be set)")
    state = clean_state_dict(ckpt['model'])
    if 'transformer.wpe.weight' in state:
        state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:cfg['block_size']]
    log(f"fine-tuning from {source}: {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, "
        f"block_size {cfg['block_size']} (of {theirs['block_size']}), dropout {cfg['dropout']}")
    return {'model': state, 'model_args': {**{k: cfg[k] for k in MODEL_KEYS}, 'vocab_size': theirs['vocab_size']}}


def check_init_from(source, out_dir):
    """train.py's --init_from names a start that exists (a hub name is fetched later), and a fine-tune
    would not overwrite the checkpoint it starts from."""
    if source in ('scratch', 'resume') or (source in GPT2_HUB and not os.path.exists(source)):
        return
    if not os.path.exists(source):
        die(f"--init_from={source}: no such checkpoint file or folder; pass scratch, resume, a path to a "
            f"ckpt.pt / best_model_params.pt / Hugging Face GPT-2 folder, or one of {', '.join(GPT2_HUB)}")
    outputs = [os.path.realpath(os.path.join(out_dir, n)) for n in ('ckpt.pt', 'best_model_params.pt')]
    if os.path.realpath(source) in outputs:
        die(f"--init_from={source} is where this run saves its checkpoints: pass another --out_dir "
            f"(or --init_from=resume to continue that run)")
