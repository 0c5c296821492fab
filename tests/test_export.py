"""export.py: SLM checkpoints -> Hugging Face GPT-2 folders (same logits, same greedy text, same
tokens) and back (same weights); bad input stops with one line."""
import json
import os
from dataclasses import asdict

import pytest
import torch

os.environ['HF_HUB_OFFLINE'] = '1'  # tests never touch the network
os.environ['TRANSFORMERS_VERBOSITY'] = 'error'
transformers = pytest.importorskip('transformers')  # a test-only dependency

import checkpoints  # noqa: E402
import common  # noqa: E402
from conftest import error_of, one_line_error, run_script  # noqa: E402
from data import EOT_TOKEN, get_tokenizer  # noqa: E402
import export  # noqa: E402
import hf  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

OFFLINE = {'HF_HUB_OFFLINE': '1'}  # export.py run as a user runs it, never touching the network
EOT = EOT_TOKEN
TINY = dict(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1)  # GPT-2 vocab: the tokenizer ships too


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny models run fastest on one thread: two threads fighting over a shared CPU are 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == 'GPT2LMHeadModel'
    return model.eval()


def our_logits_all_positions(model, idx):
    """Our forward returns only the last position's logits at inference, so run it on every prefix."""
    with torch.no_grad():
        return torch.cat([model(idx[:, :t])[0] for t in range(1, idx.size(1) + 1)], dim=1)


def assert_same_model(ours, folder, idx, prompt):
    """HF's logits equal ours at every position, and 50 greedy tokens are identical."""
    ours.eval()
    hf_model = load_hf(folder)
    with torch.no_grad():
        hf_logits = hf_model(idx).logits
    our_logits = our_logits_all_positions(ours, idx)
    assert hf_logits.shape == our_logits.shape == (idx.size(0), idx.size(1), ours.config.vocab_size)
    diff = (hf_logits - our_logits).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"
    # eos_token_id=None: HF would stop at <|endoftext|>, our loop never stops early
    hf_tokens = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50,
                                  do_sample=False, eos_token_id=None)
    ours_tokens = ours.generate(prompt, 50, temperature=0.0)  # temperature 0 = greedy
    assert hf_tokens.shape == (1, prompt.size(1) + 50)
    assert hf_tokens.tolist() == ours_tokens.tolist()
    return diff


def assert_same_weights(a, b):
    a, b = checkpoints.clean_state_dict(a), checkpoints.clean_state_dict(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def story_tokens(path, n_stories):
    enc = get_tokenizer()
    stories = [s.strip() for s in path.read_text(encoding='utf-8').split('<|endoftext|>') if s.strip()]
    return stories[:n_stories], [t for s in stories[:n_stories] for t in enc.encode_ordinary(s) + [EOT]]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, stories_dir):
    """A tiny GPT trained for a few dozen AdamW steps on real TinyStories tokens, saved as train.py does."""
    torch.manual_seed(1337)
    _, tokens = story_tokens(stories_dir / 'train.txt', 300)
    data = torch.tensor(tokens)
    config = GPTConfig(**TINY)
    model = GPT(config, verbose=False)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95), device_type='cpu')
    gen = torch.Generator().manual_seed(0)
    losses = []
    for it in range(30):
        ix = torch.randint(len(data) - config.block_size - 1, (4,), generator=gen)
        x = torch.stack([data[i:i + config.block_size] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + config.block_size] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0, f"training did not learn: {losses[0]:.2f} -> {losses[-1]:.2f}"
    out_dir = tmp_path_factory.mktemp('out')
    ckpt_path = out_dir / 'best_model_params.pt'
    common.torch_save({'model': model.state_dict(), 'model_args': asdict(config),
                       'config': {'data_dir': 'data/tinystories', 'batch_size': 4, 'learning_rate': 3e-3},
                       'iter_num': 30, 'best_val_loss': losses[-1]}, ckpt_path)
    with open(out_dir / 'log.jsonl', 'w') as f:
        for it in (0, 15, 29):
            f.write(json.dumps({'iter': it, 'tokens': it * 256, 'train_loss': losses[it], 'val_loss': losses[it] + 0.1,
                                'lr': 3e-3, 'tokens_per_s': 1.0, 'mfu': 0.0, 'elapsed_s': 1.0}) + '\n')
    return model.eval(), ckpt_path, losses


# -----------------------------------------------------------------------------


@pytest.mark.parametrize('bias', [True, False])
def test_export_layout_is_model_layout(bias):
    """hf.py's GPT-2 tensor list is exactly model.py's state dict: names and shapes."""
    args = asdict(GPTConfig(**TINY, bias=bias))
    model = GPT(GPTConfig(**args), verbose=False)
    assert hf.gpt2_shapes(args, bias) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('bias', [True, False])
def test_random_model_exports_exactly(tmp_path, bias):
    torch.manual_seed(0)
    config = GPTConfig(**TINY, bias=bias)
    model = GPT(config, verbose=False).eval()
    if not bias:  # perturb the LayerNorm gains so a wrong zero-bias or gain mapping would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if 'ln' in name:
                    p.add_(0.5 * torch.randn_like(p))
    folder = export.export({'model': model.state_dict(), 'model_args': asdict(config)}, tmp_path / 'hf')
    idx = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(1))
    assert_same_model(model, folder, idx, idx[:1, :10])
    # and back: checkpoints.read_checkpoint imports the folder into our layout, bit for bit
    back = checkpoints.read_checkpoint(folder)
    assert back['model_args'] == asdict(config)
    assert_same_weights(back['model'], model.state_dict())
    with open(os.path.join(folder, 'config.json')) as f:
        hf_config = json.load(f)
    assert hf_config['activation_function'] == 'gelu' and hf_config['n_positions'] == config.block_size
    from safetensors import safe_open
    with safe_open(os.path.join(folder, 'model.safetensors'), 'pt') as f:
        assert 'lm_head.weight' not in f.keys()  # tied: stored once
        assert tuple(f.get_tensor('transformer.h.0.mlp.c_fc.weight').shape) == (32, 128)  # Conv1D (in, out)
        if not bias:
            assert not f.get_tensor('transformer.h.1.attn.c_attn.bias').any()


def test_trained_checkpoint_cli_export_and_tokenizer(tmp_path, trained, stories_dir):
    model, ckpt_path, losses = trained
    out = tmp_path / 'export' / 'slm-hf'
    r = run_script('export.py', f'--ckpt={ckpt_path}', f'--out={out}', env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'generation_config.json', 'merges.txt',
                                       'model.safetensors', 'tokenizer_config.json', 'vocab.json']
    assert os.listdir(out.parent) == ['slm-hf']  # no temp folders left behind

    # the exported tokenizer encodes real stories to tiktoken's ids, and decodes them back
    tok = transformers.AutoTokenizer.from_pretrained(out)
    stories, ids = story_tokens(stories_dir / 'validation.txt', 1000)
    text = '<|endoftext|>'.join(stories) + '<|endoftext|>'
    assert tok(text)['input_ids'] == ids
    assert tok.decode(ids) == text and tok.eos_token_id == EOT

    prompt = torch.tensor([ids[:8]])
    idx = torch.tensor([ids[100:100 + 64], ids[300:300 + 64]])
    assert_same_model(model, out, idx, prompt)

    # round trip export -> import gives the trained weights back
    assert_same_weights(checkpoints.read_checkpoint(str(out))['model'], model.state_dict())

    card = (out / 'README.md').read_text()
    assert f"{losses[29]:.4f}" in card and 'data/tinystories' in card and '| 2 | 2 | 32 | 64 | 50257' in card

    # a second export into the same folder needs --force, then replaces it
    r = run_script('export.py', f'--ckpt={ckpt_path}', f'--out={out}', env=OFFLINE)
    msg = one_line_error(r)
    assert 'already exists' in msg and '--force' in msg
    (out / 'stale.txt').write_text('x')
    export.main([f'--ckpt={ckpt_path}', f'--out={out}', '--force'])
    assert not (out / 'stale.txt').exists() and os.listdir(out.parent) == ['slm-hf']
    assert_same_weights(checkpoints.read_checkpoint(str(out))['model'], model.state_dict())


def test_hf_gpt2_folders_import(tmp_path, capfd):
    """GPT-2 folders written by transformers itself load into our model with the same logits."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                        activation_function='gelu')
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them count
        for name, p in hf_model.named_parameters():
            if name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / 'saved')
    model, ckpt = checkpoints.load_model(str(tmp_path / 'saved'))
    assert ckpt['model_args'] == dict(vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=32,
                                      dropout=0.1, bias=True)
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf_model(idx).logits - our_logits_all_positions(model.eval(), idx)).abs().max().item()
    assert diff < 1e-4

    # the layout OpenAI's GPT-2 ships: pytorch_model.bin, no 'transformer.' prefix, causal-mask buffers,
    # untrimmed lm_head, tanh GELU (imported with a note: close to ours, not bit-equal)
    legacy = tmp_path / 'legacy'
    legacy.mkdir()
    state = {k.removeprefix('transformer.'): v for k, v in hf_model.state_dict().items()}
    state['lm_head.weight'] = state['wte.weight']
    for i in range(2):
        state[f'h.{i}.attn.bias'] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    torch.save(state, legacy / 'pytorch_model.bin')
    (legacy / 'config.json').write_text(json.dumps({**hf_config.to_dict(), 'activation_function': 'gelu_new'}))
    capfd.readouterr()
    legacy_ckpt = checkpoints.read_checkpoint(str(legacy))
    assert 'gelu_new' in capfd.readouterr().err
    assert_same_weights(legacy_ckpt['model'], ckpt['model'])


def test_bad_inputs(tmp_path, trained):
    model, ckpt_path, _ = trained
    good = torch.load(ckpt_path, weights_only=True)

    assert 'no checkpoint at' in error_of(export.main, [f'--ckpt={tmp_path}/nope.pt', f'--out={tmp_path}/x'])
    assert not (tmp_path / 'x').exists()

    def fails(checkpoint, out=None, **kw):
        msg = error_of(export.export, checkpoint, out or tmp_path / 'bad', **kw)
        assert not (tmp_path / 'bad').exists()
        return msg

    sd = good['model']
    assert 'not GPT-2-shaped' in fails({'model': sd, 'model_args': {**good['model_args'], 'n_kv_head': 1}})
    assert 'not GPT-2-shaped' in fails({'model': {k: v for k, v in sd.items() if 'mlp.c_fc' not in k},
                                        'model_args': good['model_args']})
    assert 'not GPT-2-shaped' in fails({'model': {**sd, 'transformer.h.0.attn.rotary.inv_freq': torch.ones(4)},
                                        'model_args': good['model_args']})
    assert 'not GPT-2-shaped' in fails({'model': sd, 'model_args': {**good['model_args'], 'n_embd': 48}})
    assert 'not tied' in fails({'model': {**sd, 'lm_head.weight': sd['lm_head.weight'] + 1},
                                'model_args': good['model_args']})
    small = GPT(GPTConfig(**{**TINY, 'vocab_size': 100}), verbose=False)
    assert 'vocab_size=100' in fails({'model': small.state_dict(), 'model_args': asdict(small.config)})

    # --force only ever replaces an earlier export: never a folder of other things
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.txt').write_text('mine')
    assert 'refusing' in fails(good, other, force=True)
    assert (other / 'notes.txt').read_text() == 'mine'

    # HF folders that are not GPT-2-shaped, or have no weights
    for name, change in (('llama', {'model_type': 'llama', 'architectures': ['LlamaForCausalLM']}),
                         ('relu', {'activation_function': 'relu'}),
                         ('untied', {'tie_word_embeddings': False})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / 'config.json').write_text(json.dumps({**hf.hf_config(good['model_args'], 'float32'), **change}))
        msg = error_of(checkpoints.read_checkpoint, str(folder))
        assert name in msg or 'tie_word_embeddings' in msg
    empty = tmp_path / 'noweights'
    empty.mkdir()
    (empty / 'config.json').write_text(json.dumps(hf.hf_config(good['model_args'], 'float32')))
    assert 'no model.safetensors' in error_of(checkpoints.read_checkpoint, str(empty))


def test_interrupted_export_leaves_no_folder(tmp_path, trained, monkeypatch):
    _, ckpt_path, _ = trained
    good = torch.load(ckpt_path, weights_only=True)
    real_write = export.write_folder

    def crash(folder, *a):
        real_write(folder, *a)
        raise KeyboardInterrupt  # Ctrl-C after every file is written, before the rename

    monkeypatch.setattr(export, 'write_folder', crash)
    with pytest.raises(KeyboardInterrupt):
        export.export(good, tmp_path / 'hf')
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(export, 'write_folder', real_write)
    export.export(good, tmp_path / 'hf')
    before = {n: (tmp_path / 'hf' / n).read_bytes() for n in os.listdir(tmp_path / 'hf')}
    monkeypatch.setattr(export, 'write_folder', crash)
    with pytest.raises(KeyboardInterrupt):
        export.export(good, tmp_path / 'hf', force=True)
    assert os.listdir(tmp_path) == ['hf']  # the earlier export is still there, untouched
    assert {n: (tmp_path / 'hf' / n).read_bytes() for n in os.listdir(tmp_path / 'hf')} == before
