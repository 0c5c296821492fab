"""Bad values of every flag of sample.py, eval.py, export.py, plot.py, bench.py and serve.py, and train.py's
--init_from (a fine-tune's source): each stops
with one line (error: <problem>: <fix>), no traceback, and writes nothing. One row per case,
run in-process through the script's main(argv).

In argv, {ckpt} is a tiny checkpoint, {F} a folder of ready-made files shared by the rows (a
run, data, a plain file, a folder, broken outputs), {T} this row's own empty folder and {RO}
a folder this process cannot write (rows using it skip where no such folder can be made).
sample, eval and export rows get --ckpt={F}/afile, which is no checkpoint at all: a bad flag
must stop the script before it loads the model, or the row sees the checkpoint's error instead.
Rows that need the model to find the fault name --ckpt={ckpt}."""
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import bench
import common
import eval as ev
import export
import plot
import sample
import serve
import train
from conftest import error_of
from model import GPT, GPTConfig

MAIN = {'sample': sample.main, 'eval': ev.main, 'export': export.main, 'plot': plot.main, 'bench': bench.main,
        'serve': serve.main, 'train': train.main}

# flags every row of a script starts with (a row's own flags come later and win): the row
# names its input and output, and should a check be missing the run stays small and quick
BASE = {
    'sample': ['--ckpt={F}/afile', '--num_samples=1', '--max_new_tokens=2', '--device=cpu'],
    'eval': ['--ckpt={F}/afile', '--data={F}/data/val.bin', '--num_samples=1', '--max_new_tokens=2',
             '--device=cpu'],
    'export': ['--ckpt={F}/afile', '--out={T}/hf'],
    'plot': ['--out_dir={T}/run'],
    'bench': ['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--vocab_size=64', '--batch_size=1',
              '--iters=1', '--repeats=1', '--warmup=0', '--gemm_size=64', '--copy_mb=1', '--batches=1',
              '--new_tokens=2', '--prompt_tokens=2', '--nocache=False', '--mb=0.01', '--threads=1',
              '--device=cpu', '--json={T}/bench.json'],
    'serve': ['--ckpt={F}/afile', '--port=0', '--device=cpu'],
    'train': ['--data_dir={F}/data', '--out_dir={T}/out', '--device=cpu', '--max_iters=1', '--eval_iters=1',
              '--report=False'],
}

CASES = [
    # sample.py
    ('sample', ['--num_samples=0'], '--num_samples=0 must be in [1, inf)'),
    ('sample', ['--num_samples=-3'], '--num_samples=-3 must be in [1, inf)'),
    ('sample', ['--max_new_tokens=-5'], '--max_new_tokens=-5 must be in [1, 1_000_000]'),
    ('sample', ['--max_new_tokens=1000000000000'], '--max_new_tokens=1000000000000 must be in [1, 1_000_000]'),
    ('sample', ['--num_samples=2.5'], 'num_samples must be int'),
    ('sample', ['--temperature=-0.5'], '--temperature=-0.5 must be in [0, inf)'),
    ('sample', ['--temperature=1e999'], '--temperature=inf must be in [0, inf)'),
    ('sample', ['--temperature=None'], 'temperature cannot be None'),
    ('sample', ['--top_k=-3'], '--top_k=-3 must be in [0, inf)'),
    ('sample', ['--top_k=many'], 'top_k must be int'),
    ('sample', ['--top_p=0'], '--top_p=0.0 must be in (0, 1]'),
    ('sample', ['--top_p=-0.5'], '--top_p=-0.5 must be in (0, 1]'),
    ('sample', ['--top_p=1e999'], '--top_p=inf must be in (0, 1]'),
    ('sample', ['--seed=-1'], '--seed=-1 must be in [0, 2**63)'),
    ('sample', ['--seed=100000000000000000000'], '--seed=100000000000000000000 must be in [0, 2**63)'),
    ('sample', ['--kv_cache=False', '--fast_window'], '--fast_window=True needs the kv cache'),
    ('sample', ['--compile=None'], 'compile cannot be None'),
    ('sample', ['--device=gpu9'], "device 'gpu9' is not usable here"),
    ('sample', ['--dtype=int8'], "dtype 'int8' is not one of"),
    ('sample', ['--ckpt={F}/adir'], 'is a folder, not a checkpoint file'),
    ('sample', [], 'could not read checkpoint'),  # BASE's --ckpt={F}/afile
    ('sample', ['--ckpt=', '--out_dir={F}/afile'], 'is a file, not a run folder'),
    ('sample', ['--start=FILE:{F}/adir'], 'cannot read the prompt file'),
    ('sample', ['--start=FILE:{F}/nope.txt'], 'cannot read the prompt file'),
    ('sample', ['--start=FILE:{ckpt}'], 'cannot read the prompt file'),  # not UTF-8 text
    # eval.py
    ('eval', ['--batch_size=0'], '--batch_size=0 must be in [1, inf)'),
    ('eval', ['--batch_size=-2'], '--batch_size=-2 must be in [1, inf)'),
    ('eval', ['--batch_size=None'], 'batch_size cannot be None'),
    ('eval', ['--block_size=-4'], '--block_size=-4 must be in [0, inf)'),
    ('eval', ['--ckpt={ckpt}', '--block_size=32'], "longer than the model's context (16 tokens)"),
    ('eval', ['--stride=-1'], '--stride=-1 must be in [0, inf)'),
    ('eval', ['--block_size=8', '--stride=9'], '--stride=9 must be between 1 and the block size 8'),
    ('eval', ['--ckpt={ckpt}', '--stride=17'], '--stride=17 must be between 1 and the block size 16'),
    ('eval', ['--num_samples=-1'], '--num_samples=-1 must be in [0, inf)'),
    ('eval', ['--show=-1'], '--show=-1 must be in [0, inf)'),
    ('eval', ['--max_new_tokens=0'], '--max_new_tokens=0 must be in [1, 1_000_000]'),
    ('eval', ['--max_new_tokens=1000000000000'], '--max_new_tokens=1000000000000 must be in [1, 1_000_000]'),
    ('eval', ['--temperature=-1'], '--temperature=-1.0 must be in [0, inf)'),
    ('eval', ['--temperature=1e999'], '--temperature=inf must be in [0, inf)'),
    ('eval', ['--top_p=0'], '--top_p=0.0 must be in (0, 1]'),
    ('eval', ['--top_p=1.5'], '--top_p=1.5 must be in (0, 1]'),
    ('eval', ['--top_k=-1'], '--top_k=-1 must be in [0, inf)'),
    ('eval', ['--dtype=int8'], "dtype 'int8' is not one of"),
    ('eval', ['--seed=-7'], '--seed=-7 must be in [0, 2**63)'),
    ('eval', ['--data={F}/adir'], 'a folder, not a .bin file'),
    ('eval', ['--data={F}/nope.bin'], 'no data at'),
    ('eval', ['--data=', '--text_files={F}/adir'], 'is a folder: --text_files takes'),
    ('eval', ['--data=', '--text_files={F}/story.txt,{F}/nope.txt'], 'nope.txt not found'),
    ('eval', ['--data=', '--text_files=,'], "--text_files=',' names no file"),
    ('eval', ['--text_files={F}/story.txt'], 'not both'),
    ('eval', ['--data=', '--report', '--text_files={F}/story.txt'], 'drop --text_files'),
    ('eval', ['--ckpt={F}/adir'], 'is a folder, not a checkpoint file'),
    ('eval', ['--ckpt=', '--out_dir={F}/afile'], 'is a file, not a run folder'),
    ('eval', ['--report', '--out_dir={F}/afile/run'], 'cannot be made'),
    ('eval', ['--report', '--out_dir={F}/pngdir'], 'loss_curve.png is a folder, so --report cannot write it'),
    ('eval', ['--report', '--out_dir={F}/reportdir'], 'report.md is a folder, so --report cannot write it'),
    ('eval', ['--report', '--out_dir={RO}'], 'is not writable here'),
    # export.py
    ('export', ['--out={F}/afile'], 'is a file, not a folder'),
    ('export', ['--out={F}/afile/hf'], 'cannot be made'),
    ('export', ['--out={RO}/hf'], 'is not writable here'),
    ('export', ['--out={RO}'], 'is not writable here'),
    ('export', ['--out={F}/run'], 'already exists and is not empty'),
    ('export', ['--out={F}/run', '--force'], 'does not look like an exported model'),
    ('export', ['--out='], '--out is empty'),
    ('export', ['--ckpt='], '--ckpt is empty'),
    ('export', ['--ckpt={F}/adir'], 'is a folder, not a checkpoint file'),
    ('export', [], 'could not read checkpoint'),  # BASE's --ckpt={F}/afile
    ('export', ['--ckpt={F}/nope.pt'], 'no checkpoint at'),
    ('export', ['--force=None'], 'force cannot be None'),
    ('export', ['--GPT2_VOCAB=100'], 'unknown option --GPT2_VOCAB; valid keys: ckpt, force, out'),
    # plot.py
    ('plot', ['--out_dir={F}/afile'], 'is a file, not a folder'),
    ('plot', ['--out_dir={F}/afile/run'], 'cannot be made'),
    ('plot', ['--out_dir={RO}'], 'is not writable here'),
    ('plot', ['--out_dir={F}/pngdir'], 'loss_curve.png is a folder'),
    ('plot', ['--out_dir={F}/adir'], 'log.jsonl holds no evaluations'),
    ('plot', ['--out_dir={F}/badlog'], 'log.jsonl holds no evaluations'),
    # bench.py
    ('bench', ['--what=fly'], "--what='fly' must be in {peak, train, sample, prepare, serve}"),
    ('bench', ['--n_layer=0'], '--n_layer=0 must be in [1, inf)'),
    ('bench', ['--n_head=0'], '--n_head=0 must be in [1, inf)'),
    ('bench', ['--n_embd=-16'], '--n_embd=-16 must be in [1, inf)'),
    ('bench', ['--n_head=3'], '--n_embd=16 must be divisible by --n_head=3'),
    ('bench', ['--vocab_size=0'], '--vocab_size=0 must be in [1, inf)'),
    ('bench', ['--what=train', '--vocab_size=70000'], 'does not fit the uint16 tokens'),
    ('bench', ['--block_size=0'], '--block_size=0 must be in [1, inf)'),
    ('bench', ['--batch_size=-1'], '--batch_size=-1 must be in [1, inf)'),
    ('bench', ['--gradient_accumulation_steps=0'], '--gradient_accumulation_steps=0 must be in [1, inf)'),
    ('bench', ['--iters=0'], '--iters=0 must be in [1, inf)'),
    ('bench', ['--repeats=-2'], '--repeats=-2 must be in [1, inf)'),
    ('bench', ['--prompt_tokens=0'], '--prompt_tokens=0 must be in [1, inf)'),
    ('bench', ['--what=sample', '--prompt_tokens=17'], '--prompt_tokens=17 must be between 1 and block_size (16)'),
    ('bench', ['--warmup=-1'], '--warmup=-1 must be in [0, inf)'),
    ('bench', ['--gemm_size=-64'], '--gemm_size=-64 must be in [0, inf)'),
    ('bench', ['--copy_mb=-1'], '--copy_mb=-1 must be in [0, inf)'),
    ('bench', ['--threads=-1'], '--threads=-1 must be in [0, inf)'),
    ('bench', ['--threads=None'], 'threads cannot be None'),
    ('bench', ['--dropout=1.0'], '--dropout=1.0 must be in [0, 1)'),
    ('bench', ['--dropout=-0.1'], '--dropout=-0.1 must be in [0, 1)'),
    ('bench', ['--batches=0,8'], "--batches='0,8' must be comma-separated whole numbers >= 1"),
    ('bench', ['--batches=1,x'], "--batches='1,x' must be comma-separated whole numbers >= 1"),
    ('bench', ['--new_tokens=-5'], "--new_tokens='-5' must be comma-separated whole numbers >= 1"),
    ('bench', ['--new_tokens='], "--new_tokens='' must be comma-separated whole numbers >= 1"),
    ('bench', ['--temperature=-1'], '--temperature=-1.0 must be in [0, inf)'),
    ('bench', ['--temperature=1e999'], '--temperature=inf must be in [0, inf)'),
    ('bench', ['--top_k=-2'], '--top_k=-2 must be in [0, inf)'),
    ('bench', ['--mb=0'], '--mb=0.0 must be in (0, inf)'),
    ('bench', ['--mb=-1'], '--mb=-1.0 must be in (0, inf)'),
    ('bench', ['--mb=1e999'], '--mb=inf must be in (0, inf)'),
    ('bench', ['--what=prepare', '--text={F}/adir'], 'adir is a folder: pass a text file'),
    ('bench', ['--what=prepare', '--text={F}/nope.txt'], 'nope.txt not found: pass a text file'),
    ('bench', ['--device=gpu9'], "device 'gpu9' is not usable here"),
    ('bench', ['--seed=-1'], '--seed=-1 must be in [0, 2**63)'),
    ('bench', ['--json={F}/adir'], 'is a folder, not a file'),
    ('bench', ['--json={F}/afile/bench.json'], 'cannot be made'),
    ('bench', ['--json={RO}/bench.json'], 'is not writable here'),
    # serve.py (a row that got past its checks would serve forever: only rows that stop before binding)
    ('serve', ['--nope=1'], 'unknown option --nope'),
    ('serve', ['--port=70000'], '--port=70000 must be in [0, 65535]'),
    ('serve', ['--port=-1'], '--port=-1 must be in [0, 65535]'),
    ('serve', ['--concurrency=0'], '--concurrency=0 must be in [1, inf)'),
    ('serve', ['--queue=-1'], '--queue=-1 must be in [0, inf)'),
    ('serve', ['--max_tokens_limit=0'], '--max_tokens_limit=0 must be in [1, inf)'),
    ('serve', [], 'afile'),
    ('serve', ['--ckpt={T}/nope.pt'], 'nope.pt'),
    ('serve', ['--ckpt=', '--out_dir={F}/adir'], 'best_model_params.pt'),
    # train.py --init_from: a fine-tune takes its shape from the source ({ckpt}: 1 layer, 2 heads, 16 wide, 16 positions)
    ('train', ['--init_from={ckpt}', '--n_layer=3'], 'n_layer=3 (set by a flag or config file) disagrees with'),
    ('train', ['--init_from={ckpt}', '--n_embd=32'], 'n_embd=32 (set by a flag or config file) disagrees with'),
    ('train', ['--init_from={ckpt}', '--bias=False'], 'bias=False (set by a flag or config file) disagrees with'),
    ('train', ['--init_from={ckpt}', '--block_size=64'], "block_size=64 is larger than"),
    ('train', ['--init_from={T}/nope.pt'], 'nope.pt: no such checkpoint file or folder'),
    ('train', ['--init_from={F}/afile'], 'could not read checkpoint'),
    ('train', ['--init_from={F}/adir'], 'is a folder, not a checkpoint file'),
    ('train', ['--init_from={ckpt}', '--out_dir={F}/run'], 'is where this run saves its checkpoints'),
]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """The ready-made inputs and broken outputs the rows point at."""
    F = tmp_path_factory.mktemp('files')
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)  # GPT-2's vocabulary: export takes it
    (F / 'run').mkdir()
    ckpt = F / 'run' / 'best_model_params.pt'
    common.torch_save({'model': GPT(config, verbose=False).state_dict(), 'model_args': asdict(config),
                       'config': {'data_dir': str(F / 'data')}}, ckpt)
    log = ''.join(json.dumps({'iter': i, 'tokens': 64 * i, 'train_loss': 9.0, 'val_loss': 9.1, 'lr': 1e-3}) + '\n'
                  for i in range(3))
    (F / 'run' / 'log.jsonl').write_text(log)
    (F / 'data').mkdir()
    np.arange(100, 180, dtype=np.uint16).tofile(F / 'data' / 'val.bin')
    common.save_json({'vocab_size': 50257, 'dtype': 'uint16',
                      'splits': {'val': {'file': 'val.bin', 'tokens': 80, 'text_bytes': 300}}},
                     F / 'data' / 'meta.json')
    (F / 'story.txt').write_text('Once upon a time there was a cat.\n<|endoftext|>\n')
    (F / 'afile').write_text('a file, where a folder is expected')
    (F / 'adir').mkdir()
    for name, broken in (('pngdir', 'loss_curve.png'), ('reportdir', 'report.md')):  # an output that is a folder
        (F / name / broken).mkdir(parents=True)
        (F / name / 'log.jsonl').write_text(log)
    (F / 'badlog').mkdir()
    (F / 'badlog' / 'log.jsonl').write_bytes(b'\xff\xfe not utf-8\n')
    return F, ckpt


def tree(*folders):
    """Every path under folders, with its size and mtime: what a run could have changed."""
    out = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in dirs + names:
                st = os.stat(os.path.join(root, name))
                out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize('script, args, message', CASES,
                         ids=[f"{s} {' '.join(a) or '(base flags)'}" for s, a, _ in CASES])
def test_bad_flag_stops_with_one_line_and_writes_nothing(script, args, message, files, tmp_path, request):
    F, ckpt = files
    RO = request.getfixturevalue('readonly_dir') if any('{RO}' in a for a in args) else None
    argv = [a.format(F=F, T=tmp_path, RO=RO, ckpt=ckpt) for a in BASE[script] + args]
    before = tree(F, tmp_path)
    msg = error_of(MAIN[script], argv)  # one line starting "error: ", a SystemExit, no other exception
    assert message in msg, msg
    assert tree(F, tmp_path) == before  # no file, no folder, no half-written output
