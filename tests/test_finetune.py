"""train.py --init_from=<a model>: fine-tuning from a Hugging Face GPT-2 folder (saved by
transformers, or by export.py) and from a nanoGPT checkpoint. At step 0 the run's losses equal
the source model's own forward on the same batches; the loss falls; sample.py reads the result;
a stopped fine-tune resumes bit for bit; a hub name offline stops with one line. Every run uses
config/finetune_tinystories.py as shipped, sizes shrunk (the source model is tiny)."""
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ['HF_HUB_OFFLINE'] = '1'  # tests never touch the network
os.environ['TRANSFORMERS_VERBOSITY'] = 'error'
transformers = pytest.importorskip('transformers')  # a test-only dependency

import train  # noqa: E402
from conftest import (assert_same_state, one_line_error, prepare_stories, read_log, run_script,  # noqa: E402
                      run_until_sigterm)
from model import GPT, GPTConfig  # noqa: E402

FINETUNE = 'config/finetune_tinystories.py'
# sizes only: the source model is tiny, so are its batches; the config's schedule, evaluation
# and checkpoint policy run as shipped
SHRINK = ['--batch_size=4', '--gradient_accumulation_steps=2', '--block_size=32', '--eval_iters=2',
          '--eval_interval=4', '--max_iters=12', '--device=cpu', '--dtype=float32']
SEED, EVAL_ITERS, BATCH, BLOCK = 1337, 2, 4, 32


def finetune_args(source, data_dir, out_dir, *args):
    """train.py's arguments for a fine-tune of source: the config as shipped, its sizes shrunk."""
    return [FINETUNE, f'--init_from={source}', f'--data_dir={data_dir}', f'--out_dir={out_dir}', *SHRINK, *args]


def finetune(source, data_dir, out_dir, *args, **kw):
    return run_script('train.py', *finetune_args(source, data_dir, out_dir, *args), **kw)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, stories_dir):
    return prepare_stories(tmp_path_factory.mktemp('data') / 'stories', stories_dir / 'validation.txt',
                           stories_dir / 'sample5.txt')


def random_hf_gpt2(n_positions=64):
    """A small random GPT2LMHeadModel (exact GELU: SLM's; OpenAI's tanh GELU differs by ~1e-3),
    its zero-initialised biases made to count."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                                     activation_function='gelu')
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    return hf


def eval_batches(data_dir, split):
    """The windows train.py's evaluation draws (its own generator, seeded with the run's seed)."""
    data = np.memmap(data_dir / f'{split}.bin', dtype=np.uint16, mode='r')
    gen = torch.Generator().manual_seed(SEED)
    return [train.get_batch(data, BATCH, BLOCK, gen, 'cpu') for _ in range(EVAL_ITERS)]


def expected_losses(logits_fn, data_dir):
    """{split: mean loss over the evaluation's batches} by the source model's own forward."""
    out = {}
    with torch.no_grad():
        for split in ('train', 'val'):
            losses = [F.cross_entropy(logits_fn(x).flatten(0, 1), y.flatten()).item()
                      for x, y in eval_batches(data_dir, split)]
            out[split] = sum(losses) / len(losses)
    return out


def assert_starts_at_the_source(out_dir, expected):
    first = read_log(out_dir)[0]
    assert first['iter'] == 0
    assert abs(first['train_loss'] - expected['train']) < 1e-5, (first, expected)
    assert abs(first['val_loss'] - expected['val']) < 1e-5, (first, expected)


def assert_trained_and_samples(out_dir, stdout):
    rows = read_log(out_dir)
    assert [r['iter'] for r in rows] == [0, 4, 8, 12]
    assert rows[-1]['val_loss'] < rows[0]['val_loss'] and rows[-1]['train_loss'] < rows[0]['train_loss']
    ckpt = torch.load(out_dir / 'best_model_params.pt', weights_only=True)
    assert ckpt['model_args']['block_size'] == BLOCK and ckpt['model']['transformer.wpe.weight'].shape[0] == BLOCK
    s = run_script('sample.py', f'--out_dir={out_dir}', '--start=Once upon a time', '--num_samples=1',
                   '--max_new_tokens=8')
    assert s.returncode == 0, s.stderr
    assert 'Once upon a time' in s.stdout


def test_from_a_transformers_gpt2_folder(data_dir, tmp_path):
    """A GPT2LMHeadModel saved by transformers (64 positions, cropped to 32): step 0's losses are
    the HF model's own on the same batches; the shape came from the folder; it trains."""
    hf = random_hf_gpt2()
    hf.save_pretrained(tmp_path / 'hf')
    out = tmp_path / 'out'
    r = finetune(tmp_path / 'hf', data_dir, out)
    assert r.returncode == 0, r.stderr
    assert re.search(r'^fine-tuning from .*hf: 2 layers, 4 heads, 32 wide, block_size 32 \(of 64\)', r.stdout, re.M)
    assert_starts_at_the_source(out, expected_losses(lambda x: hf(x).logits, data_dir))
    assert_trained_and_samples(out, r.stdout)
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['started_from'] == str(tmp_path / 'hf') and ckpt['config']['init_from'] == str(tmp_path / 'hf')
    assert ckpt['model_args'] == dict(block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.1, bias=True,
                                      vocab_size=50257)


def test_from_an_export_py_folder(data_dir, tmp_path):
    """An SLM checkpoint exported by export.py, fine-tuned from the folder: step 0 equals the
    folder's forward as transformers loads it."""
    torch.manual_seed(1)
    config = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    torch.save({'model': model.state_dict(), 'model_args': asdict(config)}, tmp_path / 'slm.pt')
    e = run_script('export.py', f'--ckpt={tmp_path / "slm.pt"}', f'--out={tmp_path / "hf"}')
    assert e.returncode == 0, e.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    out = tmp_path / 'out'
    r = finetune(tmp_path / 'hf', data_dir, out)
    assert r.returncode == 0, r.stderr
    assert_starts_at_the_source(out, expected_losses(lambda x: hf(x).logits, data_dir))
    assert_trained_and_samples(out, r.stdout)


def reference_logits(state, n_head, x):
    """GPT-2's forward written out from a nanoGPT state dict (nn.Linear layout), independent of
    model.py: what the nanoGPT checkpoint's own model computes."""
    w = {k.removeprefix('_orig_mod.'): v for k, v in state.items()}
    T = x.size(1)
    h = w['transformer.wte.weight'][x] + w['transformer.wpe.weight'][:T]
    C = h.size(-1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(sum(k.endswith('ln_1.weight') for k in w)):
        p = f'transformer.h.{i}.'
        a = F.layer_norm(h, (C,), w[p + 'ln_1.weight'], w[p + 'ln_1.bias'])
        q, k, v = F.linear(a, w[p + 'attn.c_attn.weight'], w[p + 'attn.c_attn.bias']).split(C, dim=-1)
        q, k, v = (t.view(*t.shape[:2], n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / (C // n_head) ** 0.5).masked_fill(~mask, float('-inf')).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(h.shape)
        h = h + F.linear(y, w[p + 'attn.c_proj.weight'], w[p + 'attn.c_proj.bias'])
        m = F.layer_norm(h, (C,), w[p + 'ln_2.weight'], w[p + 'ln_2.bias'])
        m = F.gelu(F.linear(m, w[p + 'mlp.c_fc.weight'], w[p + 'mlp.c_fc.bias']))
        h = h + F.linear(m, w[p + 'mlp.c_proj.weight'], w[p + 'mlp.c_proj.bias'])
    h = F.layer_norm(h, (C,), w['transformer.ln_f.weight'], w['transformer.ln_f.bias'])
    return h @ w['lm_head.weight'].t()


def nanogpt_checkpoint(path):
    """A ckpt.pt as nanoGPT's train.py writes it: a compiled model's keys (_orig_mod.), the vocab
    padded to 50304, its optimizer state and config beside the weights. The weights come from
    a transformers GPT-2 (Conv1D transposed into nn.Linear, as nanoGPT's from_pretrained does)."""
    hf = random_hf_gpt2(n_positions=32).state_dict()
    state = {}
    for k, v in hf.items():
        if k.endswith(('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')):
            v = v.t()
        state[k] = v.contiguous()
    extra = 0.02 * torch.randn(50304 - 50257, 32, generator=torch.Generator().manual_seed(3))
    state['transformer.wte.weight'] = state['lm_head.weight'] = torch.cat([state['transformer.wte.weight'], extra])
    state = {'_orig_mod.' + k: v for k, v in state.items()}
    model_args = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, bias=True, vocab_size=50304, dropout=0.0)
    torch.save({'model': state, 'model_args': model_args, 'iter_num': 5000, 'best_val_loss': torch.tensor(1.5),
                'optimizer': {'state': {}, 'param_groups': []}, 'config': {'dataset': 'shakespeare'}}, path)
    return state


def test_from_a_nanogpt_checkpoint_and_a_stopped_fine_tune_resumes_exactly(data_dir, tmp_path):
    """nanoGPT's ckpt.pt (vocab padded to 50304): step 0 equals GPT-2's forward on its weights;
    the fine-tune starts a new run (step 0, fresh AdamW); stopped by SIGTERM and resumed it ends
    bit for bit where the straight run ends."""
    state = nanogpt_checkpoint(tmp_path / 'nanogpt.pt')
    straight = tmp_path / 'straight'
    r = finetune(tmp_path / 'nanogpt.pt', data_dir, straight, '--dropout=0.1')
    assert r.returncode == 0, r.stderr
    assert_starts_at_the_source(straight, expected_losses(lambda x: reference_logits(state, 4, x), data_dir))
    assert_trained_and_samples(straight, r.stdout)
    ckpt = torch.load(straight / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 12 and ckpt['model_args']['vocab_size'] == 50304 and ckpt['model_args']['dropout'] == 0.1

    stopped = tmp_path / 'stopped'
    args = finetune_args(tmp_path / 'nanogpt.pt', data_dir, stopped, '--dropout=0.1')
    _, _, returncode = run_until_sigterm('iter 5/', 'train.py', *args)
    assert returncode == 143
    at = torch.load(stopped / 'ckpt.pt', weights_only=True)['iter_num']
    assert 5 <= at < 12
    resumed = run_script('train.py', *args, '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr
    assert f'resuming from {stopped}/ckpt.pt at iter {at}' in resumed.stdout
    assert_same_state(straight, stopped)
    assert torch.load(stopped / 'ckpt.pt', weights_only=True)['started_from'] == str(tmp_path / 'nanogpt.pt')


def test_a_hub_name_offline_stops_with_one_line_and_writes_nothing(data_dir, tmp_path):
    r = finetune('gpt2', data_dir, tmp_path / 'out', env={'HF_HUB_OFFLINE': '1', 'HF_HOME': tmp_path / 'hf-home'})
    err = one_line_error(r)
    assert err.startswith('error: could not download gpt2 from the Hugging Face hub'), err
    assert '--init_from=FOLDER' in err
    assert not (tmp_path / 'out').exists()


def test_the_config_names_gpt2_and_shrinks_gpt2_to_128_positions():
    """What the README's GPT-2 line runs: config/finetune_tinystories.py as shipped."""
    cfg = train.parse_config(train.config_defaults(vars(train)), [FINETUNE])
    assert cfg['init_from'] == 'gpt2' and cfg['block_size'] == 128 and not cfg['always_save_checkpoint']
    assert cfg['learning_rate'] > cfg['min_lr'] and cfg['decay_lr'] and cfg['lr_decay_iters'] == 0
