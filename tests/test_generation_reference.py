"""Generation gives the very token ids it gave before the generation code (now engine.py) was last
reworked: every mode (kv cache, no cache, fast_window, compiled), greedy and sampled, batch 1
and 3 with rows stopping at eot, inside and past block_size, against tests/generation_reference.json.

The model is tiny, seeded and its weights are scaled up (as test_engine.tiny_model), so that the
logits are far apart: float summation differences between CPUs cannot flip a token.
To re-record (only when generation is meant to change):  python tests/test_generation_reference.py --write
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, GPTConfig  # noqa: E402

REFERENCE = Path(__file__).with_name('generation_reference.json')
CONFIG = dict(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
EOT = 48  # greedy, the three rows of the batch-3 runs emit it first at steps 4, 24 and 11

# name: (batch, prompt tokens, new tokens, generate options, sampling seed); block_size is 16
GREEDY = dict(temperature=0)
TOP_K = dict(temperature=0.8, top_k=20)
TOP_P = dict(temperature=0.8, top_p=0.9)
CASES = {
    'greedy_kv_b1_inside': (1, 4, 10, GREEDY, 0),
    'greedy_kv_b3_past': (3, 5, 40, GREEDY, 0),
    'greedy_nocache_b3_past': (3, 5, 40, dict(GREEDY, use_kv_cache=False), 0),
    'greedy_fast_b3_past': (3, 5, 40, dict(GREEDY, fast_window=True), 0),
    'greedy_kv_b1_long_prompt': (1, 20, 25, GREEDY, 0),  # the prompt itself is past block_size
    'greedy_fast_b1_long_prompt': (1, 20, 25, dict(GREEDY, fast_window=True), 0),
    'plain_kv_b3_past': (3, 4, 30, dict(temperature=1.0), 3),
    'top_k_kv_b1_inside': (1, 4, 12, TOP_K, 7),
    'top_k_kv_b3_past': (3, 4, 40, TOP_K, 7),
    'top_k_nocache_b3_past': (3, 4, 40, dict(TOP_K, use_kv_cache=False), 7),
    'top_k_fast_b3_past': (3, 4, 40, dict(TOP_K, fast_window=True), 7),
    'top_p_kv_b1_past': (1, 6, 30, TOP_P, 11),
    'top_p_kv_b3_past': (3, 6, 30, TOP_P, 11),
    'top_p_nocache_b3_past': (3, 6, 30, dict(TOP_P, use_kv_cache=False), 11),
    'top_p_fast_b3_past': (3, 6, 30, dict(TOP_P, fast_window=True), 11),
    'greedy_kv_b3_eot': (3, 5, 40, dict(GREEDY, eot_token=EOT), 0),
    'greedy_nocache_b3_eot': (3, 5, 40, dict(GREEDY, eot_token=EOT, use_kv_cache=False), 0),
    'greedy_fast_b3_eot': (3, 5, 40, dict(GREEDY, eot_token=EOT, fast_window=True), 0),
    'top_k_kv_b3_eot': (3, 4, 40, dict(TOP_K, eot_token=EOT), 5),
}
COMPILED = (2, 5, 8, GREEDY, 0)  # compile is slow: one short greedy run


def reference_model():
    """The fixed tiny GPT the reference was recorded with: seeded GPT-2 init, weights x10."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG), verbose=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    return model


def run(model, batch, prompt_len, new, options, seed):
    idx = torch.randint(0, CONFIG['vocab_size'], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    return model.generate(idx, new, **options).tolist()


def record():
    model = reference_model()
    ref = {'weights_abs_sum': sum(p.abs().sum().item() for p in model.parameters()),
           'cases': {name: run(model, *case) for name, case in CASES.items()}}
    model.compile(dynamic=True)  # as sample.py --compile
    ref['cases']['compiled_greedy_b2'] = run(model, *COMPILED)
    return ref


@pytest.fixture(scope='module')
def reference():
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope='module')
def model():
    return reference_model()


def test_the_model_is_the_one_recorded(model, reference):
    # otherwise (a new torch changed the seeded init, say) every case below fails for that reason
    total = sum(p.abs().sum().item() for p in model.parameters())
    assert total == pytest.approx(reference['weights_abs_sum'], rel=1e-6)


def test_the_reference_covers_what_it_claims(reference):
    cases = reference['cases']
    assert set(cases) == set(CASES) | {'compiled_greedy_b2'}
    rows = cases['greedy_kv_b3_eot']
    stops = [row[5:].index(EOT) for row in rows]  # rows stop at different steps, the last past the window
    assert len(set(stops)) == 3 and len(rows[0]) == 5 + max(stops) + 1 < 5 + 40 and 5 + max(stops) > 16
    assert cases['greedy_kv_b3_past'] != cases['greedy_fast_b3_past']  # fast_window differs past the window
    assert len(set(cases['greedy_kv_b3_past'][0][5:])) > 5  # the tiny model's output does vary


@pytest.mark.parametrize('name', CASES)
def test_generation_gives_the_recorded_tokens(model, reference, name):
    assert run(model, *CASES[name]) == reference['cases'][name]


def test_compiled_decoding_gives_the_recorded_tokens(reference):
    model = reference_model()
    model.compile(dynamic=True)  # as sample.py --compile
    assert run(model, *COMPILED) == reference['cases']['compiled_greedy_b2']


if __name__ == '__main__':
    if sys.argv[1:] != ['--write']:
        sys.exit(__doc__)
    REFERENCE.write_text(json.dumps(record(), indent=None) + '\n')
    print(f"wrote {REFERENCE}")
