"""serve.py as users run it: a live server on 127.0.0.1 (a subprocess), the real `openai`
client against it, raw HTTP for the bad requests, a client that goes away mid-story, the
queue limit, and the page in a real headless browser (Debian's chromium and chromedriver,
which .ci/run installs). The model is a tiny random GPT over the real GPT-2 vocabulary
whose stories end after ~20 tokens (its <|endoftext|> is made likely), so both endings occur."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict

import pytest
import torch

from common import torch_save
from conftest import STORIES, run_script, start_script, tiny_checkpoint
from data import get_tokenizer
from model import GPT, GPTConfig

SEP = '\n---------------\n'


@pytest.fixture(scope='module')
def ckpt_path(tmp_path_factory):
    """A tiny random GPT whose next-token distribution is the same after any context (final
    LayerNorm's gain zeroed, its bias fixed), with <|endoftext|> at ~5%: stories of ~20 tokens."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, verbose=False)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn(32))
        logits = model.lm_head.weight @ model.transformer.ln_f.bias
        eot = get_tokenizer().eot_token
        # EOT's logit so that softmax gives it ~5%: log(0.05 / 0.95 * sum of the others' exp)
        others = torch.logsumexp(torch.cat([logits[:eot], logits[eot + 1:]]), 0)
        target = others + torch.log(torch.tensor(0.05 / 0.95))
        model.transformer.wte.weight[eot] *= target / logits[eot]
    path = tmp_path_factory.mktemp('serve') / 'best_model_params.pt'
    torch_save({'model': model.state_dict(), 'model_args': asdict(config)}, path)
    return path


def start_server(*args):
    """serve.py on a free port; returns (process, base URL) once it says where it listens."""
    proc = start_script('serve.py', '--port=0', *args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r'on (http://[\d.]+:\d+)/', line)
        if found:
            return proc, found.group(1), lines
    proc.kill()
    raise AssertionError(f"serve.py did not start: {''.join(lines)}{proc.stderr.read()}")


@pytest.fixture(scope='module')
def server(ckpt_path):
    proc, url, _ = start_server(f'--ckpt={ckpt_path}')
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope='module')
def client(server):
    openai = pytest.importorskip('openai')  # a test-only requirement (requirements-test.txt)
    return openai.OpenAI(base_url=server + '/v1', api_key='unused', max_retries=0)


def run_sample(ckpt_path, *args):
    """sample.py's stories, in the server's environment (script_env: the same threads, the same sums)."""
    r = run_script('sample.py', f'--ckpt={ckpt_path}', *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.split(SEP)[:-1]


def post(url, body, headers=None, path='/v1/completions'):
    """POST path with body (bytes as they are, anything else as JSON): (status, JSON)."""
    host, port = url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request('POST', path, data, {'Content-Type': 'application/json', **(headers or {})})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def get(url, path):
    host, port = url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request('GET', path)
    r = conn.getresponse()
    return r.status, r.read()


def test_the_openai_client_gets_the_stories_sample_py_writes(client, ckpt_path):
    """Same seed and sampling flags: the completion is sample.py's story after the prompt,
    streamed or not; n=2 gives sample.py's --num_samples=2; finish_reason says why each ended."""
    flags = dict(temperature=0.8, top_p=0.9, seed=1234, max_tokens=40, extra_body={'top_k': 200})
    stories = run_sample(ckpt_path, '--start=Once upon a time', '--num_samples=2', '--max_new_tokens=40',
                         '--temperature=0.8', '--top_p=0.9', '--top_k=200', '--seed=1234')
    done = client.completions.create(model='slm', prompt='Once upon a time', n=2, **flags)
    assert ['Once upon a time' + c.text for c in done.choices] == stories
    assert [c.index for c in done.choices] == [0, 1] and done.usage.prompt_tokens == 4
    streamed = ['', '']
    finishes = [None, None]
    for chunk in client.completions.create(model='slm', prompt='Once upon a time', n=2, stream=True, **flags):
        for c in chunk.choices:
            streamed[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert streamed == [c.text for c in done.choices] and finishes == [c.finish_reason for c in done.choices]

    # both endings: over a few seeds some stories reach <|endoftext|> ('stop'), others max_tokens ('length')
    reasons = {}
    for seed in range(8):
        done = client.completions.create(model='slm', prompt='', max_tokens=30, seed=seed)
        reasons.setdefault(done.choices[0].finish_reason, []).append(done.usage.completion_tokens)
    assert set(reasons) == {'stop', 'length'} and set(reasons['length']) == {30}, reasons


def test_stop_sequences_cut_the_story_before_them(client):
    """A stop sequence that spans two tokens (the end of one word, the space and the start of
    the next): the streamed text must hold back the first part until it knows."""
    full = client.completions.create(model='slm', prompt='A dog', max_tokens=60, seed=3, temperature=1.5).choices[0]
    spaces = [i for i, c in enumerate(full.text) if c == ' ' and full.text[i - 2:i + 3].strip() == full.text[i - 2:i + 3]]
    assert len(spaces) > 6, full.text
    stop = full.text[spaces[4] - 2:spaces[4] + 3]  # 'og th' from '... dog the ...'
    cut = full.text[:full.text.index(stop)]
    done = client.completions.create(model='slm', prompt='A dog', max_tokens=60, seed=3, temperature=1.5,
                                     stop=[stop, 'zzzz never']).choices[0]
    assert (done.text, done.finish_reason) == (cut, 'stop')
    streamed = ''.join(c.choices[0].text for c in client.completions.create(
        model='slm', prompt='A dog', max_tokens=60, seed=3, temperature=1.5, stop=stop, stream=True))
    assert streamed == cut


def test_models_health_and_unknown_routes(server):
    status, body = get(server, '/v1/models')
    assert status == 200 and [m['id'] for m in json.loads(body)['data']] == ['slm']
    status, body = get(server, '/health')
    assert status == 200 and json.loads(body)['status'] == 'ok'
    status, reply = post(server, {'model': None, 'prompt': 'A cat', 'max_tokens': 3})  # null: the default
    assert status == 200 and reply['model'] == 'slm'
    status, body = get(server, '/nope')
    assert status == 404 and 'no route GET /nope' in json.loads(body)['error']['message']


@pytest.mark.parametrize('body, param, message', [
    (b'{"prompt": "A cat", ', None, 'the body is not valid JSON'),
    (b'[1, 2]', None, 'the body must be a JSON object'),
    (b'[' * 100000, None, 'the body nests too deeply'),
    ({'prompt': 5}, 'prompt', 'prompt must be a string, a list of token ids, or a list of 1 to 16 of either'),
    ({'prompt': []}, 'prompt', 'prompt must be a string, a list of token ids'),
    ({'prompt': ['a'] * 17}, 'prompt', 'a list of 1 to 16 of either'),
    ({'prompt': [1, 2.5]}, 'prompt', 'prompt must be a string, a list of token ids'),
    ({'prompt': [[1, 50257]]}, 'prompt', 'token ids must be from 0 to 50256'),
    ({'prompt': 'A cat ' * 40}, 'prompt', 'the prompt is 81 tokens; this model reads at most 32'),
    ({'model': 'gpt-4'}, 'model', 'model "gpt-4" does not exist'),
    ({'max_tokens': '10'}, 'max_tokens', 'max_tokens="10" is not valid'),
    ({'max_tokens': 0}, 'max_tokens', 'a whole number from 1 to 1024'),
    ({'max_tokens': 100000}, 'max_tokens', 'a whole number from 1 to 1024'),
    ({'temperature': 'hot'}, 'temperature', 'temperature="hot" is not valid'),
    ({'temperature': 2.5}, 'temperature', 'a number from 0 to 2'),
    ({'top_p': 0}, 'top_p', 'a number in (0, 1]'),
    ({'top_k': -1}, 'top_k', 'top_k=-1 is not valid'),
    ({'n': 0}, 'n', 'a whole number from 1 to 8'),
    ({'n': True}, 'n', 'n=true is not valid'),
    ({'stream': 'yes'}, 'stream', 'stream="yes" is not valid'),
    ({'seed': -1}, 'seed', 'seed=-1 is not valid'),
    ({'stop': ['a', 'b', 'c', 'd', 'e']}, 'stop', 'at most 4'),
    ({'stop': 7}, 'stop', 'stop must be a string of 1 to 256 characters'),
    ({'stop': 'x' * 257}, 'stop', 'stop must be a string of 1 to 256 characters'),
    ({'echo': 1}, 'echo', 'echo=1 is not valid: it must be true or false'),
    ({'echo': True, 'stream': True}, 'echo', 'echo is not supported by this server with stream'),
    ({'logprobs': 6}, 'logprobs', 'a whole number from 0 to 5'),
    ({'logprobs': -1}, 'logprobs', 'a whole number from 0 to 5'),
    ({'logprobs': 1, 'stream': True}, 'logprobs', 'logprobs is not supported by this server with stream'),
    ({'echo': True, 'max_tokens': -1}, 'max_tokens', 'a whole number from 0 to 1024'),
    ({'best_of': 2}, 'best_of', 'best_of is not supported'),
])
def test_bad_requests_get_a_400_with_an_openai_error_body(server, body, param, message):
    status, reply = post(server, body)
    assert status == 400
    assert reply['error']['type'] == 'invalid_request_error' and reply['error']['param'] == param
    assert message in reply['error']['message'], reply


def test_the_openai_client_raises_its_own_errors_for_a_400(client):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model='slm', prompt='A cat', max_tokens=0)
    assert 'max_tokens=0 is not valid' in str(e.value)


@pytest.mark.parametrize('body, message', [
    ({}, 'messages must be a non-empty list'),
    ({'messages': []}, 'messages must be a non-empty list'),
    ({'messages': [{'role': 'wizard', 'content': 'hi'}]}, 'role "wizard" is not one of system, developer, user, assistant'),
    ({'messages': [{'role': 'system', 'content': 'Be kind.'}]}, 'messages need a user message'),
    ({'messages': [{'role': 'user', 'content': 5}]}, "a user message's content must be text"),
    ({'messages': [{'role': 'user', 'content': 'A cat ' * 40}]}, 'the prompt is 81 tokens'),
])
def test_bad_chat_requests_get_a_400_naming_messages(server, body, message):
    status, reply = post(server, body, path='/v1/chat/completions')
    assert status == 400 and reply['error']['param'] == 'messages' and message in reply['error']['message'], reply
    status, reply = post(server, {'messages': [{'role': 'user', 'content': 'Hi'}], 'logprobs': True},
                         path='/v1/chat/completions')
    assert status == 400 and 'logprobs is not supported by this server in chat' in reply['error']['message']


def model_logprobs(ckpt_path, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 from the checkpoint, one prefix at a time (not the server's way)."""
    from checkpoints import load_model
    model, _ = load_model(str(ckpt_path), 'cpu')
    model.eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids[:i]]))[0][0, -1], -1)[ids[i]].item()
                for i in range(1, len(ids))]


def test_echo_and_logprobs_score_the_prompt_as_lm_eval_reads_them(client, ckpt_path):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, max_tokens=1, logprobs=1."""
    enc = get_tokenizer()
    ids = enc.encode('Once upon a time, a cat sat on the mat.')
    done = client.completions.create(model='slm', prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0)
    lp = done.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:-1] == pytest.approx(model_logprobs(ckpt_path, ids), rel=1e-5, abs=1e-6)
    assert lp.tokens[:len(ids)] == [enc.decode([t]) for t in ids]
    assert done.choices[0].text.startswith('Once upon a time, a cat sat on the mat.')
    text = done.choices[0].text
    assert [text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)][:len(ids)] == lp.tokens[:len(ids)]
    # temperature 0: the written token is the most likely one, and its top_logprobs say so
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    # max_tokens 0 with echo: the prompt alone
    done = client.completions.create(model='slm', prompt='A dog ran.', echo=True, max_tokens=0, logprobs=0)
    assert done.choices[0].text == 'A dog ran.' and done.usage.completion_tokens == 0
    assert all(len(top) == 1 for top in done.choices[0].logprobs.top_logprobs[1:])


def test_prompt_lists_give_n_choices_per_prompt_in_order(client):
    enc = get_tokenizer()
    flags = dict(model='slm', max_tokens=8, seed=7, n=2, temperature=1.0)
    both = client.completions.create(prompt=[enc.encode('A cat'), 'A dog'], **flags)
    assert [c.index for c in both.choices] == [0, 1, 2, 3] and both.usage.prompt_tokens == 4
    # one random stream for the request, prompt by prompt: the first prompt's pair is the one it gets alone
    alone = client.completions.create(prompt='A cat', **flags)
    assert [c.text for c in both.choices[:2]] == [c.text for c in alone.choices]


def test_chat_is_a_completion_of_the_system_text_and_the_last_user_message(client):
    messages = [{'role': 'system', 'content': 'A story for a child.'}, {'role': 'user', 'content': 'About a frog'},
                {'role': 'assistant', 'content': 'A frog story.'}, {'role': 'user', 'content': [
                    {'type': 'text', 'text': 'Once there was'}]}]
    flags = dict(model='slm', max_tokens=20, seed=11, temperature=0.9)
    want = client.completions.create(prompt='A story for a child.\n\nOnce there was', **flags).choices[0]
    done = client.chat.completions.create(messages=messages, **flags)
    assert done.object == 'chat.completion' and done.choices[0].message.role == 'assistant'
    assert (done.choices[0].message.content, done.choices[0].finish_reason) == (want.text, want.finish_reason)
    assert done.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={'include_usage': True}, **flags))
    assert chunks[0].choices[0].delta.role == 'assistant' and chunks[0].object == 'chat.completion.chunk'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [want.finish_reason]
    assert chunks[-1].usage.total_tokens == done.usage.total_tokens


def test_one_connection_serves_request_after_request(server):
    """HTTP/1.1 keep-alive: a JSON answer, a streamed (chunked) one, a 400 and a 404, on one socket."""
    host, port = server.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    sockets = []
    for body in ({'prompt': 'A', 'max_tokens': 3}, {'prompt': 'B', 'max_tokens': 3, 'stream': True},
                 {'max_tokens': 'x'}, {'prompt': 'C', 'max_tokens': 2}):
        conn.request('POST', '/v1/completions', json.dumps(body), {'Content-Type': 'application/json'})
        r = conn.getresponse()
        data = r.read()
        assert r.version == 11 and not r.will_close and (b'data: [DONE]' in data if body.get('stream') else
                                                           json.loads(data)), data
        sockets.append(conn.sock)
    conn.request('GET', '/nope')
    assert conn.getresponse().read() and conn.sock is sockets[0]
    assert all(s is sockets[0] for s in sockets)


def test_a_burst_of_clients_connecting_at_once_all_get_their_stories(server):
    statuses = []
    threads = [threading.Thread(target=lambda i=i: statuses.append(
        post(server, {'prompt': 'Once', 'max_tokens': 5, 'seed': i})[0])) for i in range(32)]  # 16 write, 16 wait
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 32


def test_cors_only_for_the_origin_given(ckpt_path, server):
    proc, url, _ = start_server(f'--ckpt={ckpt_path}', '--cors_origin=http://localhost:3000')
    try:
        host, port = url.removeprefix('http://').split(':')
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request('OPTIONS', '/v1/chat/completions', headers={
            'Origin': 'http://localhost:3000', 'Access-Control-Request-Method': 'POST',
            'Access-Control-Request-Headers': 'content-type,authorization'})
        r = conn.getresponse()
        r.read()
        assert r.status == 204 and r.getheader('Access-Control-Allow-Origin') == 'http://localhost:3000'
        assert 'POST' in r.getheader('Access-Control-Allow-Methods')
        assert 'authorization' in r.getheader('Access-Control-Allow-Headers').lower()
        conn.request('POST', '/v1/completions', json.dumps({'prompt': 'A', 'max_tokens': 2}),
                     {'Content-Type': 'application/json', 'Origin': 'http://localhost:3000'})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader('Access-Control-Allow-Origin') == 'http://localhost:3000' and r.read()
    finally:
        proc.terminate()
        proc.wait(10)
    host, port = server.removeprefix('http://').split(':')  # the default: no origin but its own
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request('GET', '/v1/models', headers={'Origin': 'http://localhost:3000'})
    assert conn.getresponse().getheader('Access-Control-Allow-Origin') is None


def completion(url, body):
    status, reply = post(url, body)
    assert status == 200, reply
    return [(c['text'], c['logprobs']['token_logprobs']) for c in reply['choices']]


def test_batch_invariant_stories_do_not_depend_on_what_else_is_written(tmp_path):
    """16 seeded requests at once, arriving staggered, each among a changing crowd: every story
    and every logprob is bit for bit the one the request gets alone."""
    path = tiny_checkpoint(tmp_path / 'model.pt', block_size=64, n_layer=2, n_head=4, n_embd=128)
    proc, url, _ = start_server(f'--ckpt={path}', '--concurrency=16', '--batch_invariant=True')
    try:
        requests = [{'prompt': ['Once', 'A dog', 'The sun'][i % 3], 'max_tokens': 12 + 2 * i, 'seed': i,
                     'logprobs': 1, 'temperature': 1.0} for i in range(16)]
        alone = [completion(url, r) for r in requests]
        together = [None] * 16

        def ask(i):
            time.sleep(0.03 * i)
            together[i] = completion(url, requests[i])
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
    finally:
        proc.terminate()
        proc.wait(10)


LM_EVAL_TASK = """task: slm_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def test_lm_eval_harness_scores_a_held_out_text_as_eval_py_does(tmp_path):
    """lm-evaluation-harness's local-completions model (its own client: token-id prompts, echo,
    logprobs) on a local loglikelihood_rolling task: the summed log-likelihood of two held-out
    stories equals eval.py's over the same tokens in the same windows (127 tokens: lm-eval's
    max_length=129 keeps one for generation and one for the context)."""
    pytest.importorskip('lm_eval')  # a test-only requirement (requirements-test.txt)
    from eval import evaluate_tokens
    from checkpoints import load_model
    stories = (STORIES / 'validation.txt').read_text().split('<|endoftext|>')
    text = '\n'.join(s.strip() for s in stories[:2])
    (tmp_path / 'heldout.jsonl').write_text(json.dumps({'text': text}) + '\n')
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'slm_heldout.yaml').write_text(LM_EVAL_TASK.format(data=tmp_path / 'heldout.jsonl'))
    path = tiny_checkpoint(tmp_path / 'model.pt', block_size=128)
    weights = torch.load(path, weights_only=True)
    for name, w in weights['model'].items():  # GPT-2's init gives nearly the same odds after any context: sharpen it
        if name.endswith('weight') and w.dim() == 2:
            w.mul_(8)
    torch_save(weights, path)
    # tiktoken names the tokenizer by the model: GPT-2's BPE is 'gpt2'
    proc, url, _ = start_server(f'--ckpt={path}', '--model_name=gpt2')
    try:
        r = run_script('-m', 'lm_eval', '--model=local-completions', '--tasks=slm_heldout',
                       f'--include_path={tmp_path / "tasks"}', f'--output_path={tmp_path / "out"}', '--log_samples',
                       f'--model_args=model=gpt2,base_url={url}/v1/completions,tokenizer_backend=tiktoken,'
                       f'max_length=129,max_retries=1', env={'HF_DATASETS_OFFLINE': 1, 'HF_HUB_OFFLINE': 1},
                       timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        proc.terminate()
        proc.wait(10)
    samples = [json.loads(line) for f in (tmp_path / 'out').rglob('samples_slm_heldout*.jsonl') for line in open(f)]
    assert len(samples) == 1
    lm_eval_loglikelihood = samples[0]['resps'][0][0]
    lm_eval_loglikelihood = lm_eval_loglikelihood[0] if isinstance(lm_eval_loglikelihood, list) else lm_eval_loglikelihood
    model, _ = load_model(str(path), 'cpu')
    ids = get_tokenizer().encode(text)
    ours = evaluate_tokens(model, ids, block_size=127)
    assert ours['windows'] >= 3
    assert float(lm_eval_loglikelihood) == pytest.approx(-ours['loss_sum'], rel=1e-4)


def rss_mb(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason="reads the server's memory from /proc")
def test_memory_stays_flat_over_500_requests(ckpt_path):
    proc = start_script('serve.py', f'--ckpt={ckpt_path}', '--port=0', stderr=subprocess.DEVNULL)
    try:
        url = next(m.group(1) for line in proc.stdout if (m := re.search(r'on (http://[\d.]+:\d+)/', line)))
        kinds = [{'prompt': 'A cat', 'max_tokens': 5, 'logprobs': 2, 'echo': True},
                 {'prompt': 'A dog', 'max_tokens': 5, 'stream': True, 'n': 2},
                 {'prompt': [[1, 2, 3], 'Hi'], 'max_tokens': 3, 'stop': 'e'}]
        kinds.append({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 4, 'stream': True})
        host, port = url.removeprefix('http://').split(':')
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        for i in range(500):
            if i == 100:
                before = rss_mb(proc.pid)
            body = kinds[i % 4]
            conn.request('POST', '/v1/chat/completions' if 'messages' in body else '/v1/completions', json.dumps(body))
            r = conn.getresponse()
            assert r.status == 200 and r.read()
        after = rss_mb(proc.pid)
        assert after - before < 10, (before, after)
    finally:
        proc.terminate()
        proc.wait(10)


def wait_until_idle(url, seconds):
    """Seconds until /health says no story is being written or waiting (None: not within seconds)."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        health = json.loads(get(url, '/health')[1])
        if health['active'] == 0 and health['waiting'] == 0:
            return time.time() - t0
        time.sleep(0.05)
    return None


def open_request(url, request):
    """POST request (a dict, as JSON) to /v1/completions on a socket of its own, left open: the
    test decides when the client goes away."""
    host, port = url.removeprefix('http://').split(':')
    sock = socket.create_connection((host, int(port)), timeout=60)
    body = json.dumps(request).encode()
    sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Content-Length: %d\r\n\r\n' % len(body) + body)
    return sock


def stream_request(url, max_tokens, prompt='Once'):
    """A raw streaming request; returns its socket once the first chunk arrived."""
    sock = open_request(url, {'prompt': prompt, 'max_tokens': max_tokens, 'stream': True, 'seed': 1})
    received = b''
    while b'data: ' not in received:
        received += sock.recv(4096)
    return sock


@pytest.fixture(scope='module')
def slow_server(tmp_path_factory):
    """A model that never ends its stories and takes seconds for 1024 tokens, one story at a
    time and one waiting: for disconnects and the queue limit."""
    path = tiny_checkpoint(tmp_path_factory.mktemp('slow') / 'model.pt', block_size=64, n_layer=4, n_head=4,
                           n_embd=128)
    proc, url, _ = start_server(f'--ckpt={path}', '--concurrency=1', '--queue=1')
    yield url
    proc.terminate()
    proc.wait(10)


def test_a_client_that_goes_away_stops_its_story(slow_server):
    t0 = time.time()
    status, reply = post(slow_server, {'prompt': 'Once', 'max_tokens': 300, 'seed': 1})
    full_300 = time.time() - t0
    assert status == 200 and reply['choices'][0]['finish_reason'] == 'length'
    sock = stream_request(slow_server, max_tokens=1024)  # ~3.4x as long as the 300 above
    sock.close()
    stopped = wait_until_idle(slow_server, 30)
    assert stopped is not None and stopped < full_300 / 2, (stopped, full_300)
    # not streaming: the server notices between tokens too
    sock = open_request(slow_server, {'prompt': 'Once', 'max_tokens': 1024})
    time.sleep(0.3)
    assert json.loads(get(slow_server, '/health')[1])['active'] == 1
    sock.close()
    stopped = wait_until_idle(slow_server, 30)
    assert stopped is not None and stopped < full_300 / 2, (stopped, full_300)


def test_past_the_queue_a_request_gets_a_429_and_the_others_finish(slow_server):
    writing = stream_request(slow_server, max_tokens=1024)  # the one story at a time
    waiting = open_request(slow_server, {'prompt': 'Two', 'max_tokens': 5})
    time.sleep(0.5)  # the second request is in the queue now
    assert json.loads(get(slow_server, '/health')[1])['waiting'] == 1
    status, reply = post(slow_server, {'prompt': 'Three', 'max_tokens': 5})
    assert status == 429 and reply['error']['type'] == 'rate_limit_error'
    assert 'the server is busy: 1 being written, 1 waiting' in reply['error']['message']
    writing.close()  # the first story stops, the waiting one gets its turn
    answer = b''
    while not answer.endswith(b'}'):
        answer += waiting.recv(65536)
    assert b'200 OK' in answer.split(b'\r\n')[0] and b'"finish_reason": "length"' in answer
    waiting.close()
    assert wait_until_idle(slow_server, 30) is not None


def test_ctrl_c_stops_the_server_while_it_writes(tmp_path):
    path = tiny_checkpoint(tmp_path / 'model.pt', block_size=64, n_layer=4, n_head=4, n_embd=128)
    proc, url, _ = start_server(f'--ckpt={path}')
    sock = stream_request(url, max_tokens=1024)  # seconds of writing left
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        sock.close()
    assert 'Traceback' not in proc.stderr.read()


def test_listening_beyond_this_machine_says_what_it_exposes(ckpt_path):
    proc, url, lines = start_server(f'--ckpt={ckpt_path}', '--host=0.0.0.0')
    proc.terminate()
    proc.wait(10)
    assert lines[0].startswith('warning: listening on 0.0.0.0: anyone who can reach this machine')
    assert url.startswith('http://0.0.0.0:')


def test_the_page_streams_a_story_in_a_real_browser(slow_server):
    """Headless chromium, as wide as a phone, loads the page, writes a prompt, presses Write: the
    story grows in the DOM piece by piece to its end; then Stop stops a long one."""
    server = slow_server
    if not (shutil.which('chromium') and shutil.which('chromedriver')):
        if os.environ.get('CI'):
            pytest.fail("CI needs chromium and chromedriver for this test: apt-get install chromium chromium-driver")
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip('selenium.webdriver')
    options = webdriver.ChromeOptions()
    for flag in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=420,900'):
        options.add_argument(flag)  # 420 px wide: a phone's width
    options.binary_location = shutil.which('chromium')
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which('chromedriver')))
    try:
        browser.get(server + '/')
        find = lambda id_: browser.find_element('id', id_)
        find('prompt').clear()
        find('prompt').send_keys('The little red hen')
        find('seed').send_keys('5')
        find('max_tokens').clear()
        find('max_tokens').send_keys('200')
        find('write').click()
        lengths, t0 = set(), time.time()
        while find('status').text in ('', 'writing...') and time.time() - t0 < 60:
            lengths.add(len(find('story').text))
        story = find('story').text
        assert find('status').text == 'stopped at max new tokens', find('status').text
        assert story.startswith('The little red hen') and len(story) > len('The little red hen') + 100, story
        assert len({n for n in lengths if len('The little red hen') < n < len(story)}) >= 3  # seen growing
        # the page's layout fits a phone: nothing wider than the window
        assert browser.execute_script('return document.documentElement.scrollWidth <= window.innerWidth')
        find('max_tokens').clear()
        find('max_tokens').send_keys('1024')
        find('write').click()
        time.sleep(0.3)
        find('stop').click()
        t0 = time.time()
        while find('status').text == 'writing...' and time.time() - t0 < 10:
            time.sleep(0.05)
        assert find('status').text == 'stopped'
        assert wait_until_idle(server, 5) is not None  # the server stopped writing it too
    finally:
        browser.quit()
