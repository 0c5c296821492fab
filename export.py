"""
Export an SLM checkpoint as a Hugging Face GPT-2 folder.

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

This is the command line: its checks, and the folder put in place whole. The format, both ways,
is hf.py's: hf.write_folder writes the files, and hf.load_hf_folder reads any GPT-2-shaped HF
folder (ours, or e.g. openai-community/gpt2 downloaded by you) into our checkpoint layout;
checkpoints.read_checkpoint calls it for folders, so `python sample.py --ckpt=<hf folder>` works.
"""
import os
import shutil
from dataclasses import asdict, fields

from checkpoints import clean_state_dict, read_checkpoint
from common import check_writable, config_defaults, die, parse_config
from hf import check_gpt2_shaped, write_folder
from model import GPTConfig

# -----------------------------------------------------------------------------
# config
ckpt = 'out/best_model_params.pt'  # any SLM checkpoint: a dict with 'model' and 'model_args'
out = 'export/slm-hf'              # folder to write; must not exist or be empty, unless --force
force = False                      # replace an existing export folder at --out
# -----------------------------------------------------------------------------

GPT2_VOCAB = 50257                 # the GPT-2 BPE: 50256 merged byte strings + <|endoftext|>
MODEL_ARGS = tuple(f.name for f in fields(GPTConfig))  # what a checkpoint's model_args may hold


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
        write_folder(tmp, {**checkpoint, 'model': state_dict, 'model_args': a}, ckpt_path, out_path)
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
