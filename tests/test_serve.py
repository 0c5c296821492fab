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
import socket
import time
from dataclasses import asdict

import pytest
import torch

from common import torch_save
from conftest import run_script, start_script, tiny_checkpoint
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


def post(url, body, headers=None):
    """POST /v1/completions with body (bytes as they are, anything else as JSON): (status, JSON)."""
    host, port = url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request('POST', '/v1/completions', data, {'Content-Type': 'application/json', **(headers or {})})
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
    ({'prompt': 5}, 'prompt', 'prompt must be a string'),
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
    ({'echo': True}, 'echo', 'echo is not supported'),
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
