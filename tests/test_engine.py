"""engine.py: generation (kv cache, sampling, stopping, MKL packing) on a tiny model."""
import weakref

import pytest
import torch

from engine import MKL_PACKED_GEMM, PackedLinears, generate_stream, new_kv_cache, sample_logits
from model import GPT, GPTConfig

TINY = dict(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def tiny_model(seed=0, **overrides):
    """A small random GPT whose greedy output depends on its context: GPT-2's init is so
    flat that tiny models repeat one token, so the weights are scaled up."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}), verbose=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    return model


def prompts(batch, length, vocab=TINY['vocab_size'], seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_batch_logits_equal_rows_one_by_one():
    # batch and single-row matmuls sum in different orders (MKL picks kernels by shape): on an
    # AMD EPYC the gap reaches 7e-4 on these logits of magnitude ~30; a row mix-up is off by ~10
    model = tiny_model()
    idx = prompts(4, 11)
    with torch.no_grad():
        batch = model(idx)[0]
        rows = torch.cat([model(idx[i:i + 1])[0] for i in range(4)])
        assert torch.allclose(batch, rows, atol=3e-3, rtol=0)
        batch_cached = model(idx, kv_cache=new_kv_cache(model, 4))[0]
        rows_cached = torch.cat([model(idx[i:i + 1], kv_cache=new_kv_cache(model, 1))[0] for i in range(4)])
    assert torch.allclose(batch_cached, rows_cached, atol=3e-3, rtol=0)
    assert torch.allclose(batch_cached, batch, atol=3e-3, rtol=0)
    # and batched generation gives every row what it gets alone
    out = model.generate(idx, 30, temperature=0)
    for i in range(4):
        assert torch.equal(out[i:i + 1], model.generate(idx[i:i + 1], 30, temperature=0))


def test_cached_logits_match_the_full_forward_token_by_token():
    model = tiny_model()
    idx = prompts(2, 16)
    cache = new_kv_cache(model, 2)
    with torch.no_grad():
        logits = model(idx[:, :5], kv_cache=cache)[0]
        for t in range(5, 16):
            assert torch.allclose(logits, model(idx[:, :t])[0], atol=1e-3, rtol=0), t  # logits ~40
            logits = model(idx[:, t:t + 1], kv_cache=cache, pos=t)[0]


@pytest.mark.parametrize('batch', [1, 3])
def test_generation_follows_weight_updates(batch):
    """Decoding may use weights packed for MKL and kept between calls: after the weights
    change (as an optimizer step or load_state_dict changes them), it must use the new ones."""
    model = tiny_model()
    idx = prompts(batch, 4)
    before = model.generate(idx, 12, temperature=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # tied: the embedding changes too
        model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)
    after = model.generate(idx, 12, temperature=0)
    assert not torch.equal(before, after)
    assert torch.equal(after, model.generate(idx, 12, temperature=0, use_kv_cache=False))


@pytest.mark.skipif(not MKL_PACKED_GEMM, reason="this PyTorch build has no MKL packed GEMM")
@pytest.mark.parametrize('batch', [1, 8])
def test_packed_decoding_steps_match_plain_linear(batch):
    model = tiny_model()
    packed = PackedLinears(model, batch)
    assert len(packed.forwards) == 4 * model.config.n_layer + 1  # the blocks' Linears and lm_head
    assert sum(map(len, packed.copies.values())) == 2 * 4 * model.config.n_layer + 1  # steps, re-runs
    idx = prompts(batch, model.config.block_size)

    def run(cache, *args, **kwargs):
        with torch.no_grad():
            return model(*args, kv_cache=cache, **kwargs)[0]

    cache_plain, cache_packed = new_kv_cache(model, batch), new_kv_cache(model, batch)
    # a full window (the exact mode's re-run), then one token
    window = run(cache_plain, idx)
    with packed:
        patched = [m for m in model.modules() if 'forward' in m.__dict__]
        assert torch.allclose(run(cache_packed, idx), window, atol=1e-3, rtol=0)
        run(cache_packed, idx[:, :-1])
        fast = run(cache_packed, idx[:, -1:], pos=15)
    assert len(patched) == len(packed.forwards) and not any('forward' in m.__dict__ for m in model.modules())
    run(cache_plain, idx[:, :-1])
    plain = run(cache_plain, idx[:, -1:], pos=15)
    assert torch.allclose(fast, plain, atol=1e-3, rtol=0)  # logits ~40: fp32 summation order
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not PackedLinears(model, batch).forwards  # bf16 activations: plain F.linear


@pytest.mark.skipif(not MKL_PACKED_GEMM, reason="this PyTorch build has no MKL packed GEMM")
def test_packed_copies_last_from_one_decoding_to_the_next_and_go_when_the_model_trains():
    """Decoding reuses the copies while the weights stay; a backward pass frees them, as its
    optimizer step would make them stale: train.py decodes between steps and need not hold them."""
    model = tiny_model()
    for _ in range(2):  # and again after the first training step
        model.eval()
        copy = weakref.ref(PackedLinears(model, 1).copies[model.lm_head][1])
        model.generate(prompts(1, 3), 4)
        assert copy() is PackedLinears(model, 1).copies[model.lm_head][1]  # not packed again
        model.train()
        model(prompts(2, 8), prompts(2, 8, seed=2))[1].backward()
        assert copy() is None
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-3 * p.grad  # a step: the next decoding packs the new weights


def test_compiled_decoding_gives_the_eager_tokens():
    # torch.compile cannot lower MKL's packed GEMM: a compiled model must take the plain path
    model = tiny_model()
    idx = prompts(2, 5)
    eager = model.generate(idx, 8, temperature=0)
    model.compile(dynamic=True)  # as sample.py --compile
    assert not PackedLinears(model, 2).forwards
    assert torch.equal(model.generate(idx, 8, temperature=0), eager)


@pytest.mark.parametrize('prompt_len, new', [(3, 10), (5, 40), (16, 20), (30, 25)])
def test_kv_cache_greedy_equals_no_cache_reference(prompt_len, new):
    # block_size is 16: (5, 40) and (16, 20) run far past it, (30, 25) starts past it
    model = tiny_model()
    idx = prompts(3, prompt_len)
    reference = model.generate(idx, new, temperature=0, use_kv_cache=False)
    cached = model.generate(idx, new, temperature=0)
    assert cached.shape == (3, prompt_len + new)
    assert torch.equal(cached, reference)
    assert len(set(reference[0, prompt_len:].tolist())) > 3  # the test model's output does vary


def test_kv_cache_sampling_equals_no_cache_reference_with_the_same_seed():
    model = tiny_model()
    idx = prompts(2, 4)
    torch.manual_seed(7)
    reference = model.generate(idx, 40, temperature=1.0, top_k=20, use_kv_cache=False)
    torch.manual_seed(7)
    assert torch.equal(model.generate(idx, 40, temperature=1.0, top_k=20), reference)


def fast_window_reference(model, idx, new):
    """What fast_window promises, the slow way: once the context outgrows block_size it
    restarts from the last block_size // 2 tokens and grows again; greedy."""
    bs = model.config.block_size
    tokens, start = idx, max(0, idx.size(1) - bs)
    for _ in range(new):
        if tokens.size(1) - start > bs:
            start = tokens.size(1) - bs // 2
        with torch.no_grad():
            logits = model(tokens[:, start:])[0][:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_fast_window_keeps_half_the_window_and_differs_from_exact_only_past_block_size():
    model = tiny_model()
    idx = prompts(2, 5)
    fast = model.generate(idx, 60, temperature=0, fast_window=True)
    assert torch.equal(fast, fast_window_reference(model, idx, 60))
    exact = model.generate(idx, 60, temperature=0)
    assert torch.equal(fast[:, :17], exact[:, :17])  # identical until the window first fills
    assert not torch.equal(fast, exact)


def test_generate_stream_yields_what_generate_returns():
    model = tiny_model()
    idx = prompts(2, 3)
    steps = list(generate_stream(model, idx, 12, temperature=0))
    assert len(steps) == 12 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), model.generate(idx, 12, temperature=0)[:, 3:])


def test_each_row_stops_at_eot_and_generation_ends_when_all_have():
    model = tiny_model()
    idx = prompts(3, 4, seed=3)
    idx[2] = idx[0]
    free = model.generate(idx, 30, temperature=0)[:, 4:]
    eot = free[0, 3].item()  # a token row 0 emits (so rows 0 and 2 stop by step 3)

    def expected_row(row):  # the free run up to and including its first eot, then eot padding
        hits = (row == eot).nonzero()
        end = hits[0].item() + 1 if len(hits) else len(row)
        return torch.cat([row[:end], torch.full((len(row) - end,), eot)])

    out = model.generate(idx, 30, temperature=0, eot_token=eot)[:, 4:]
    firsts = [((free[i] == eot).nonzero()[:1].tolist() or [[29]])[0][0] for i in range(3)]
    assert out.shape[1] == max(firsts) + 1  # stops as soon as every row is done
    for i in range(3):
        assert torch.equal(out[i], expected_row(free[i])[:out.shape[1]])
    # two rows that both stop: generation ends there, before max_new_tokens
    short = model.generate(idx[[0, 2]], 30, temperature=0, eot_token=eot)
    assert short.shape[1] == 4 + firsts[0] + 1 < 4 + 30
    assert short[0, -1].item() == eot


def test_same_seed_same_samples_other_seed_other_samples():
    model = tiny_model()
    idx = prompts(2, 3)

    def run(seed):
        torch.manual_seed(seed)
        return model.generate(idx, 30, temperature=1.0, top_p=0.9)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def draw(probs, n=40000, **kwargs):
    """Token frequencies of n draws from a toy distribution through sample_logits."""
    logits = torch.tensor(probs).log().expand(n, -1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_logits(logits, **kwargs), minlength=len(probs))
    return counts.float() / n


TOY = [0.1, 0.5, 0.15, 0.25]  # sorted: token 1, 3, 2, 0


@pytest.mark.parametrize('kwargs, expected', [
    (dict(), TOY),
    (dict(top_k=2), [0, 2 / 3, 0, 1 / 3]),
    (dict(top_k=1), [0, 1, 0, 0]),
    (dict(top_p=0.5), [0, 1, 0, 0]),               # token 1 alone reaches 0.5
    (dict(top_p=0.6), [0, 2 / 3, 0, 1 / 3]),       # 0.5 < 0.6: token 3 joins
    (dict(top_p=0.8), [0, 0.5 / 0.9, 0.15 / 0.9, 0.25 / 0.9]),
    (dict(top_k=3, top_p=0.6), [0, 2 / 3, 0, 1 / 3]),
    (dict(top_p=1.0), TOY),
    (dict(temperature=0.5), [p * p / sum(q * q for q in TOY) for p in TOY]),  # p^(1/T), renormalised
])
def test_top_k_top_p_and_temperature_on_a_toy_distribution(kwargs, expected):
    freqs = draw(TOY, **kwargs)
    assert torch.allclose(freqs, torch.tensor(expected, dtype=torch.float), atol=0.012), (freqs, expected)


@pytest.mark.parametrize('scale, n', [(3.0, 8000), (0.01, 2000)])  # peaked: a small nucleus; flat: 2695 tokens
def test_nucleus_over_a_large_vocabulary_matches_a_full_sort(scale, n):
    logits = torch.randn(1, 3000, generator=torch.Generator().manual_seed(0)) * scale
    probs = logits.softmax(-1)[0]
    sorted_probs, order = probs.sort(descending=True)
    n_keep = int((sorted_probs.cumsum(-1) - sorted_probs < 0.9).sum())
    nucleus = order[:n_keep]
    torch.manual_seed(0)
    draws = sample_logits(logits.expand(n, -1), top_p=0.9)
    assert torch.isin(draws, nucleus).all()
    expected = sorted_probs[:n_keep] / sorted_probs[:n_keep].sum()
    freqs = torch.bincount(draws, minlength=3000)[nucleus].float() / n
    if n_keep > 1000:
        assert freqs[1000:].sum() > 0.5 * expected[1000:].sum()  # the tail past the 1000 most likely is drawn
    else:
        assert torch.allclose(freqs[:5], expected[:5], atol=0.02)


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert sample_logits(logits, temperature=0).tolist() == [1, 0]
    model = tiny_model()
    idx = prompts(2, 3)
    assert torch.equal(model.generate(idx, 20, temperature=0), model.generate(idx, 20, top_k=1))


@pytest.mark.parametrize('kwargs', [dict(temperature=-0.5), dict(temperature=float('inf')), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5)])
def test_bad_sampling_options_raise(kwargs):
    model = tiny_model()
    with pytest.raises(ValueError):
        model.generate(prompts(1, 3), 5, **kwargs)


def test_top_k_zero_means_all_tokens_as_none_does():
    """One meaning of top_k=0 everywhere (generate, sample.py, eval.py, bench.py): no top-k filter."""
    model = tiny_model()
    for top_p in (None, 0.9):
        draws = []
        for top_k in (0, None):
            torch.manual_seed(5)
            draws.append(model.generate(prompts(2, 3), 20, temperature=1.0, top_k=top_k, top_p=top_p))
        assert torch.equal(*draws)


def run_batch(model, stories, size, invariant, join_every=1):
    """engine.Batch writing stories [(ids, max_new_tokens, seed, (temperature, top_k, top_p))], the
    next joining every join_every steps while a row is free: per story its [(token, logits)]."""
    from engine import Batch
    batch, out, waiting, step = Batch(model, size, invariant), {}, list(enumerate(stories)), 0
    while waiting or batch.running:
        if waiting and len(batch.running) < size and step % join_every == 0:
            i, (ids, n, seed, sampling) = waiting.pop(0)
            batch.add(ids, n, *sampling, torch.Generator().manual_seed(seed)).i = i
        for seq, token, logits in batch.step():
            out.setdefault(seq.i, []).append((token, logits.clone()))
        step += 1
    return [out[i] for i in range(len(stories))]


def test_a_batch_writes_each_story_as_it_would_be_written_alone():
    """Stories joining and leaving a Batch at different steps, some past block_size (the window
    re-runs), with sampling options of their own or shared: alone, a story is generate_stream's;
    with batch_invariant, its logits and tokens are bit for bit the same whatever else is in the batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=128, dropout=0.0), verbose=False).eval()
    options = [(0.9, 20, None), (1.0, None, 0.8), (0.0, None, None), (0.9, 20, None), (1.0, 50, None)]
    stories = [([1 + i, 7, 3][:1 + i % 3], 10 + 5 * i, i, options[i % 5]) for i in range(7)]
    for story in stories:
        ids, n, seed, sampling = story
        alone = [t.item() for t in generate_stream(model, torch.tensor([ids]), n, *sampling,
                                                   generator=torch.Generator().manual_seed(seed))]
        assert [t for t, _ in run_batch(model, [story], 4, False)[0]] == alone
    alone = [run_batch(model, [story], 4, True)[0] for story in stories]
    for join_every in (1, 3):
        crowd = run_batch(model, stories, 4, True, join_every)
        for got, want in zip(crowd, alone):
            assert [t for t, _ in got] == [t for t, _ in want]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
