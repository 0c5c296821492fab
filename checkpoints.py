"""
Where a model comes from: a checkpoint file, SLM's or nanoGPT's (the same layout: {'model':
state_dict, 'model_args': dict, ...}, loaded with weights_only=True), a Hugging Face GPT-2 folder
(read by hf.load_hf_folder into that layout), or OpenAI's GPT-2 by name, downloaded from the hub.
"""
import os

from common import die
from hf import load_hf_folder


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
