"""eval.py: exact full-pass loss, bits per byte, story-quality figures, the run report, bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import common
from conftest import error_of, one_line_error, run_script, tiny_checkpoint
from data import EOT_TOKEN, get_tokenizer
import eval as ev

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=True)  # GPT-2's vocabulary


def save_tiny_ckpt(path, data_dir='data/tinystories', **overrides):
    return tiny_checkpoint(path, config={'data_dir': str(data_dir), 'batch_size': 4}, **{**TINY, **overrides})


def write_bin(folder, tokens, text_bytes=None, split='val'):
    """A split the way prepare.py lays it out: uint16 tokens plus meta.json."""
    os.makedirs(folder, exist_ok=True)
    np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    info = {'file': f'{split}.bin', 'tokens': len(tokens), 'stories': 1, 'text_bytes': text_bytes}
    common.save_json({'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_token': EOT_TOKEN, 'dtype': 'uint16',
                      'splits': {split: info}}, os.path.join(folder, 'meta.json'))
    return os.path.join(folder, f'{split}.bin')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'best_model_params.pt'
    save_tiny_ckpt(path)
    model, _ = checkpoints.load_model(str(path))
    return model


def hand_loss(model, tokens, T, S):
    """Sum of -log p(token) the slow, obvious way: for every token j of EOT + tokens, the
    window that scores it starts at s (window k covers targets s+1..s+T and scores the ones
    the window before did not), and the model's own inference path gives the next-token
    logits after y[s:j]. No batching, no masking, no fused loss."""
    y = [EOT_TOKEN] + [int(t) for t in tokens]
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(y)):
            s = 0 if j <= T else math.ceil((j - T) / S) * S
            assert 1 <= j - s <= T
            logits, _ = model(torch.tensor([y[s:j]]))
            total += F.cross_entropy(logits[0, -1:].double(), torch.tensor([y[j]])).item()
    return total


@pytest.mark.parametrize('stride', [16, 8, 5])
def test_full_pass_equals_hand_computation(tiny, stride):
    tokens = np.random.default_rng(1).integers(0, 50257, size=53).astype(np.uint16)  # not a multiple of 16
    out = ev.evaluate_tokens(tiny, tokens, stride=stride, batch_size=3)
    assert out['tokens'] == 53  # every token is a target, the first one included
    assert out['windows'] == 1 + math.ceil((53 - 16) / stride)
    assert out['loss_sum'] == pytest.approx(hand_loss(tiny, tokens, 16, stride), rel=1e-5)
    assert out['loss'] == pytest.approx(out['loss_sum'] / 53)


def test_full_pass_ignores_batching_and_dropout(tiny):
    tokens = np.random.default_rng(2).integers(0, 50257, size=100).astype(np.uint16)
    tiny.train()  # evaluate_tokens must switch dropout off itself
    a = ev.evaluate_tokens(tiny, tokens, batch_size=1)
    b = ev.evaluate_tokens(tiny, tokens, batch_size=5)
    assert not tiny.training
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-6)
    short = ev.evaluate_tokens(tiny, tokens[:3])  # shorter than one window
    assert short['tokens'] == 3 and short['loss_sum'] == pytest.approx(hand_loss(tiny, tokens[:3], 16, 16), rel=1e-5)


def test_bits_per_byte_from_text_files_and_bin_agree(tmp_path, tiny):
    stories = ["Tom had a red ball. He liked it.", "Über das café ☕ lief ein Hund."]
    text = "".join(f"{s}\n<|endoftext|>\n" for s in stories)
    (tmp_path / 'a.txt').write_text(text, encoding='utf-8')
    n_bytes = sum(len(s.encode('utf-8')) for s in stories)
    assert n_bytes == len(stories[0]) + len(stories[1]) + 4  # Ü, é, ☕ take 2, 2, 3 bytes

    tokens, text_bytes = ev.read_text_files([str(tmp_path / 'a.txt')])
    assert text_bytes == n_bytes
    enc = get_tokenizer()
    assert list(tokens) == enc.encode_ordinary(stories[0]) + [EOT_TOKEN] + enc.encode_ordinary(stories[1]) + [EOT_TOKEN]
    out = ev.add_bits_per_byte(ev.evaluate_tokens(tiny, tokens), text_bytes)
    assert out['bits_per_byte'] == pytest.approx(out['loss'] * out['tokens'] / n_bytes / math.log(2))
    assert out['perplexity'] == pytest.approx(math.exp(out['loss']))

    # the same tokens as a .bin beside meta.json: same loss, bytes from meta's text_bytes
    bin_path = write_bin(tmp_path / 'data', tokens, text_bytes=n_bytes)
    bin_tokens, bin_bytes = ev.read_bin(bin_path, 50257)
    assert bin_bytes == n_bytes
    assert ev.evaluate_tokens(tiny, bin_tokens)['loss'] == pytest.approx(out['loss'], rel=1e-6)


def test_cli_prints_the_figures(tmp_path):
    save_tiny_ckpt(tmp_path / 'best_model_params.pt')
    tokens = np.random.default_rng(3).integers(0, 50257, size=200)
    bin_path = write_bin(tmp_path / 'data', tokens, text_bytes=800)
    r = run_script('eval.py', f'--ckpt={tmp_path}/best_model_params.pt', f'--data={bin_path}', '--num_samples=0')
    assert r.returncode == 0, r.stderr
    figures = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.strip()}
    loss, bpb = float(figures['loss']), float(figures['bits/byte'])
    assert float(figures['perplexity']) == pytest.approx(math.exp(loss), rel=1e-3)
    assert bpb == pytest.approx(loss * 200 / 800 / math.log(2), rel=1e-3)
    assert figures['tokens'] == '200'


def test_quality_metrics_on_hand_made_stories():
    assert ev.words("Hi, Tom! It's big.") == ['hi', 'tom', "it's", 'big']
    a, b = "the cat sat. The cat ran", "a dog"
    # unigrams: the cat sat the cat ran a dog -> 6 distinct of 8
    assert ev.distinct_n([a, b], 1) == pytest.approx(6 / 8)
    # bigrams: (the cat)(cat sat)(sat the)(the cat)(cat ran) + (a dog) -> 5 distinct of 6
    assert ev.distinct_n([a, b], 2) == pytest.approx(5 / 6)
    assert ev.distinct_n([a, b], 3) == pytest.approx(1.0)
    assert ev.distinct_n(["", "hi"], 2) == 0.0
    loop = "he ran and ran and ran and ran"  # 4-grams: 5, distinct: (he ran and ran)(ran and ran and)(and ran and ran)
    assert ev.repeated_ngram_fraction(loop) == pytest.approx(2 / 5)
    assert ev.repeated_ngram_fraction("one two three four five") == 0.0
    assert ev.repeated_ngram_fraction("too short") == 0.0

    q = ev.quality_metrics([loop, "one two three four five", "hi"], [True, False, True])
    assert q['samples'] == 3
    assert q['ended'] == pytest.approx(2 / 3)
    assert q['mean_words'] == pytest.approx((8 + 5 + 1) / 3)
    assert q['repeated_4grams'] == pytest.approx((2 / 5 + 0.0) / 2)  # stories without a 4-gram do not count
    assert q['distinct_1'] == pytest.approx(ev.distinct_n([loop, "one two three four five", "hi"], 1))


def test_story_sampling_is_seeded_and_cut_at_endoftext(tiny):
    kw = dict(num_samples=2, max_new_tokens=10, seed=7)
    a, b = ev.sample_stories(tiny, **kw), ev.sample_stories(tiny, **kw)
    assert a == b
    assert [s["prompt"] for s in a] == ev.PROMPTS[:2]
    enc = get_tokenizer()
    for s in a:
        n = len(enc.encode_ordinary(s['text']))
        assert '<|endoftext|>' not in s['text']
        assert s['ended'] or n >= 8  # an unfinished story used its whole budget (decode/encode may merge a little)
    metrics, stories = ev.evaluate_quality(tiny, **kw)
    assert stories == a and metrics["samples"] == 2


def write_run(run, data_dir, n_evals=3):
    os.makedirs(run, exist_ok=True)
    save_tiny_ckpt(os.path.join(run, 'best_model_params.pt'), data_dir=data_dir)
    rows = [{'iter': 20 * i, 'tokens': 20 * i * 64, 'train_loss': 10.8 - i, 'val_loss': 10.9 - i,
             'lr': 1e-3, 'tokens_per_s': 5000.0 + i, 'mfu': 0.01 * i, 'elapsed_s': 3.0 * i} for i in range(n_evals)]
    with open(os.path.join(run, 'log.jsonl'), 'w') as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_report_has_every_section_and_the_curve(tmp_path):
    data_dir = tmp_path / 'data'
    write_bin(data_dir, np.random.default_rng(4).integers(0, 50257, size=120), text_bytes=500)
    run = tmp_path / 'run'
    write_run(run, data_dir)
    path = ev.write_report(str(run), num_samples=5, max_new_tokens=8)
    assert path == os.path.join(run, 'report.md')
    text = open(path).read()
    for section in ['## Summary', '## Config', '## Model', '## Training', '## Loss curve', '## Evaluation',
                    '## Story quality', '## Sample stories']:
        assert section in text, section
    assert (run / 'loss_curve.png').stat().st_size > 1000
    assert '![loss curve](loss_curve.png)' in text
    for figure in ['tokens seen | 2,560', 'wall time | 0.1 min', 'best val loss (log estimate) | 8.9000',
                   'final train / val loss (log estimate) | 8.8000 / 8.9000', 'MFU (median of logged intervals) | 1.5%',
                   'val bits per byte', 'distinct-1 / 2 / 3', '| batch_size | `4` |']:
        assert figure in text, figure
    assert text.count('**Story ') == 5 and '**Once upon a time**' in text  # five sample stories
    full = ev.evaluate_tokens(checkpoints.load_model(str(run / 'best_model_params.pt'))[0],
                              np.fromfile(data_dir / 'val.bin', dtype=np.uint16))
    assert f"val bits per byte | {full['loss_sum'] / math.log(2) / 500:.4f}" in text
    assert not [f for f in os.listdir(run) if '.tmp' in f]  # written atomically

    os.remove(run / 'loss_curve.png')
    ev.main(['--report', f'--out_dir={run}', '--max_new_tokens=4'])  # the command line, redrawing the curve
    assert (run / 'loss_curve.png').is_file() and open(path).read().count('**Story ') == 5


def test_bad_input_is_one_line(tmp_path, tiny):
    ckpt = tmp_path / 'best_model_params.pt'
    save_tiny_ckpt(ckpt)
    good = write_bin(tmp_path / 'good', [1, 2, 3, EOT_TOKEN], text_bytes=10)
    c = f'--ckpt={ckpt}'
    # missing files
    assert 'no checkpoint at' in error_of(ev.main, [f'--ckpt={tmp_path}/nope.pt', f'--data={good}'])
    assert 'no data at' in error_of(ev.main, [c, f'--data={tmp_path}/nope.bin'])
    assert 'not found' in error_of(ev.main, [c, f'--text_files={tmp_path}/nope.txt'])
    assert 'log.jsonl holds no evaluations' in error_of(ev.main, ['--report', f'--out_dir={tmp_path}'])
    # empty data
    (tmp_path / 'empty.bin').write_bytes(b'')
    assert 'not a non-empty file' in error_of(ev.main, [c, f'--data={tmp_path}/empty.bin'])
    (tmp_path / 'blank.txt').write_text("\n<|endoftext|>\n\n")
    assert 'stor' in error_of(ev.main, [c, f'--text_files={tmp_path}/blank.txt'])
    # vocabulary mismatch: a token id the model has no row for
    small = tmp_path / 'small.pt'
    save_tiny_ckpt(small, vocab_size=1000)
    assert 'vocab' in error_of(ev.main, [f'--ckpt={small}', f'--data={good}', '--num_samples=0'])
    (tmp_path / 'raw').mkdir()
    np.array([5, 70000 % 65536, 999], dtype=np.uint16).tofile(tmp_path / 'raw' / 'x.bin')  # no meta.json
    assert 'token id 4464' in error_of(ev.main, [f'--ckpt={small}', f'--data={tmp_path}/raw/x.bin', '--num_samples=0'])
    # block size longer than the model's context, impossible stride
    assert "model's context (16 tokens)" in error_of(ev.main, [c, f'--data={good}', '--block_size=32'])
    assert '--stride=17' in error_of(ev.main, [c, f'--data={good}', '--stride=17'])
    # a checkpoint whose weights do not fit its own model_args (block size mismatch)
    ck = torch.load(ckpt, weights_only=True)
    ck['model_args']['block_size'] = 32
    common.torch_save(ck, tmp_path / 'mismatch.pt')
    assert 'does not match' in error_of(ev.main, [f'--ckpt={tmp_path}/mismatch.pt', f'--data={good}'])
    # meta.json that disagrees with the .bin (truncated file)
    with open(good, 'ab') as f:
        f.write(b'\x01\x00')
    assert 'truncated or stale' in error_of(ev.main, [c, f'--data={good}'])
    # flags
    msg = error_of(ev.main, [c, '--strid=3'])
    assert 'unknown option --strid' in msg and ' stride,' in msg and 'EOT' not in msg  # only config keys listed
    assert '--top_p=1.5 must be in (0, 1]' in error_of(ev.main, [c, f'--data={good}', '--top_p=1.5'])
    assert 'not both' in error_of(ev.main, [c, f'--data={good}', f'--text_files={tmp_path}/blank.txt'])

    r = run_script('eval.py', f'--ckpt={tmp_path}/nope.pt')  # and as a user sees it: exit 1, one line, no traceback
    assert 'no checkpoint at' in one_line_error(r)
