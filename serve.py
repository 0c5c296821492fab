"""
A story playground: a web page that streams stories as they are written, and an
OpenAI-compatible completions API, from one trained SLM model.

    python serve.py                                  # out/best_model_params.pt, on http://127.0.0.1:8000
    python serve.py --ckpt=export/slm-hf --port=8080 # any checkpoint, or an exported folder
    curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Once upon a time", "max_tokens": 100, "seed": 1, "stream": true}'

GET / is the page. POST /v1/completions takes OpenAI's prompt, max_tokens, temperature, top_p,
n, stream (server-sent events in OpenAI's chunk format), stop and seed, plus top_k; stories end
at <|endoftext|> and finish_reason says why one stopped. GET /v1/models lists the model, GET
/health says how busy the server is. With a seed, a completion is the story sample.py writes
with the same seed and flags. The standard library's http.server is enough for this: one page,
three small JSON routes and a stream, no framework needed.

One worker thread runs the model: it advances each story being written by one token in turn,
so up to `concurrency` of them stream at once; further requests wait in a queue of `queue`,
and past that get a 429. A client that goes away stops its story at the next token.
"""
import collections
import json
import os
import queue as queues
import random
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from checkpoints import load_model
from common import config_defaults, die, parse_config
from data import get_tokenizer, story_text
from device import autocast, pick_device, pick_dtype
from engine import generate_stream, sampling_problem

# -----------------------------------------------------------------------------
out_dir = 'out'            # serves out_dir/best_model_params.pt, the best checkpoint train.py saved
ckpt = ''                  # a checkpoint file (or exported folder) to serve instead
host = '127.0.0.1'         # the address to listen on: this machine only; 0.0.0.0 = every network
port = 8000                # 0 = any free port (printed); in [0, 65535]
model_name = 'slm'         # the model's id in the API (/v1/models; a request's "model" must match)
concurrency = 4            # stories written at once, a token each in turn; in [1, inf)
queue = 16                 # requests that may wait for a turn; past that a 429; in [0, inf)
max_tokens_limit = 1024    # the most tokens a request may ask for, per story; in [1, inf)
device = 'auto'            # auto = cuda, else mps, else cpu
dtype = 'auto'             # float32, bfloat16 or float16; auto = bf16/fp16 on GPUs, fp32 elsewhere
# -----------------------------------------------------------------------------

MAX_BODY = 1 << 20         # bytes of JSON a request may send
MAX_STOPS = 4              # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 256       # characters per stop sequence (each token checks them all)


class BadRequest(Exception):
    """A request the API refuses: 400 (or status) with an OpenAI-style error body."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def check_request(body, cfg, enc, block_size):
    """The completion request as a dict of checked values, or BadRequest naming the field."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e}): send a JSON object") from None
    except RecursionError:
        raise BadRequest("the body nests too deeply: send a flat JSON object") from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object, e.g. {\"prompt\": \"Once upon a time\"}")

    def field(name, kinds, default, ok=lambda v: True, rule=''):
        value = req.get(name)
        if value is None:  # absent or null: the default, as OpenAI's API
            return default
        if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds) or not ok(value):
            raise BadRequest(f"{name}={json.dumps(value)} is not valid: it must be {rule}", param=name)
        return value

    if req.get('model') not in (None, cfg['model_name']):
        raise BadRequest(f"model {json.dumps(req['model'])} does not exist: this server has {cfg['model_name']!r}",
                         param='model', code='model_not_found')
    prompt = req.get('prompt', '')
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (or a list holding one)", param='prompt')
    ids = enc.encode(prompt, allowed_special={'<|endoftext|>'})
    if len(ids) > block_size:
        raise BadRequest(f"the prompt is {len(ids)} tokens; this model reads at most {block_size}: shorten it",
                         param='prompt')
    stop = req.get('stop')
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (isinstance(stops, list) and len(stops) <= MAX_STOPS
                                  and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise BadRequest(f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                         f"{MAX_STOPS} of them", param='stop')
    number = (int, float)
    checked = dict(
        prompt=prompt, ids=ids, stops=stops or [],
        max_tokens=field('max_tokens', (int,), 16, lambda v: 1 <= v <= cfg['max_tokens_limit'],
                         f"a whole number from 1 to {cfg['max_tokens_limit']}"),
        temperature=field('temperature', number, 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
        top_p=field('top_p', number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=field('top_k', (int,), None, lambda v: v >= 0, "a whole number >= 0 (0 = all tokens)"),
        n=field('n', (int,), 1, lambda v: 1 <= v <= 8, "a whole number from 1 to 8"),
        stream=field('stream', (bool,), False, rule="true or false"),
        seed=field('seed', (int,), None, lambda v: 0 <= v < 2**63, "a whole number from 0 to 2**63 - 1"))
    for name, unsupported in (('echo', lambda v: v not in (None, False)), ('logprobs', lambda v: v is not None),
                              ('best_of', lambda v: v not in (None, 1)), ('suffix', lambda v: v is not None)):
        if unsupported(req.get(name)):
            raise BadRequest(f"{name} is not supported by this server", param=name)
    problem = sampling_problem(checked['temperature'], checked['top_k'], checked['top_p'])
    if problem:
        raise BadRequest(problem)
    return checked


def held_back(text, stops):
    """How many characters at the end of text could start a stop sequence: they wait until the
    next piece says whether it is one."""
    return max([k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])], default=0)


def completion_events(model, enc, req, device):
    """The request's n stories as events (index, text, finish_reason): text pieces as they are
    written, then one event with finish_reason 'stop' (<|endoftext|> or a stop sequence) or
    'length' (max_tokens). The n stories come one after another from one random stream seeded
    by the request's seed, as sample.py's --num_samples do."""
    generator = torch.Generator(device=device).manual_seed(req['seed'])
    req['completion_tokens'] = 0  # for the response's usage
    x = torch.tensor([([enc.eot_token] + req['ids'])[-model.config.block_size:]], dtype=torch.long, device=device)
    for index in range(req['n']):
        tokens = []
        stream = generate_stream(model, x, req['max_tokens'], req['temperature'], req['top_k'], req['top_p'],
                                 eot_token=enc.eot_token, generator=generator)
        text, sent, finish = '', 0, None
        for piece in story_text(enc, (tokens.append(t.item()) or tokens[-1] for t in stream)):
            text += piece
            cuts = [i for i in (text.find(s, max(0, sent - len(s))) for s in req['stops']) if i >= 0]
            if cuts:
                text, finish = text[:min(cuts)], 'stop'
                break
            ready = len(text) - held_back(text, req['stops'])
            if ready > sent:
                yield index, text[sent:ready], None
                sent = ready
        if finish is None:
            finish = 'stop' if tokens and tokens[-1] == enc.eot_token else 'length'
        if len(text) > sent:
            yield index, text[sent:], None
        req['completion_tokens'] += len(tokens)
        yield index, '', finish
        stream.close()


class Job:
    """One request's stories: the worker puts its events into out, then None; cancelled
    (its client went away) stops it; error says what broke it, if something did."""

    def __init__(self, events):
        self.events, self.out, self.cancelled, self.error = events, queues.SimpleQueue(), False, None


class Worker:
    """The one thread that runs the model. Each round advances every active job by one event
    (about a token), so up to concurrency stories are written at once; waiting jobs start as
    active ones finish."""

    def __init__(self, concurrency, queue_size, ctx):
        self.concurrency, self.queue_size, self.ctx = concurrency, queue_size, ctx
        self.waiting, self.active = collections.deque(), []
        self.changed = threading.Condition()
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, job):
        """Queue job; False if the queue is full (the caller answers 429)."""
        with self.changed:
            if len(self.active) + len(self.waiting) >= self.concurrency + self.queue_size:
                return False
            self.waiting.append(job)
            self.changed.notify()
        return True

    def load(self):
        with self.changed:
            return len(self.active), len(self.waiting)

    def run(self):
        with self.ctx:
            while True:
                with self.changed:
                    while not self.active and not self.waiting:
                        self.changed.wait()
                    while self.waiting and len(self.active) < self.concurrency:
                        self.active.append(self.waiting.popleft())
                    jobs = list(self.active)
                for job in jobs:
                    try:
                        event = None if job.cancelled else next(job.events, None)
                    except Exception as e:  # a bug, or the device failing: this request fails, the server goes on
                        print(f"error: a story failed: {e!r}", file=sys.stderr, flush=True)
                        event, job.error = None, f"generation failed ({e.__class__.__name__})"
                    if event is None:  # done, failed, or its client went away
                        job.events.close()
                        job.out.put(None)
                        with self.changed:
                            self.active.remove(job)
                    else:
                        job.out.put(event)


def client_gone(sock):
    """Whether the client closed its end: its socket reads as ended (or reset). poll, where there
    is one: select cannot watch a socket numbered past 1023."""
    try:
        if hasattr(select, 'poll'):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        else:  # Windows
            readable = bool(select.select([sock], [], [], 0)[0])
        return readable and sock.recv(1, socket.MSG_PEEK) == b''
    except OSError:
        return True


def error_body(status, message, param=None, code=None):
    """OpenAI's error object; its type follows the HTTP status."""
    kind = {404: 'not_found_error', 429: 'rate_limit_error', 500: 'server_error'}.get(status, 'invalid_request_error')
    return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


class Handler(BaseHTTPRequestHandler):
    server_version = 'SLM'
    timeout = 60  # seconds a socket read or write may hang: a client that stops sending mid-body
    app = None  # set by main(): the model, tokenizer, worker and config

    def log_message(self, fmt, *args):  # one short line per request on stderr
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def send_body(self, status, body, content_type):
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status, obj):
        self.send_body(status, json.dumps(obj).encode(), 'application/json')

    def send_error_json(self, status, message, param=None, code=None):
        self.send_json(status, error_body(status, message, param, code))

    def do_GET(self):
        app = self.app
        if self.path == '/':
            page = PAGE.replace('MAX_TOKENS_LIMIT', str(app['cfg']['max_tokens_limit']))
            self.send_body(200, page.encode(), 'text/html; charset=utf-8')
        elif self.path == '/v1/models':
            self.send_json(200, {'object': 'list', 'data': [
                {'id': app['cfg']['model_name'], 'object': 'model', 'created': app['created'], 'owned_by': 'slm'}]})
        elif self.path == '/health':
            active, waiting = app['worker'].load()
            self.send_json(200, {'status': 'ok', 'model': app['cfg']['model_name'], 'active': active,
                                 'waiting': waiting, 'concurrency': app['cfg']['concurrency']})
        else:
            self.send_error_json(404, f"no route GET {self.path}: try /, /v1/models, /health or POST /v1/completions")

    def relay_events(self, job, req, head):
        """The job's events until it ends, each sent on as a server-sent chunk if the request
        streams; returns each story's text and finish_reason. ConnectionAbortedError (an OSError)
        if the client goes away."""
        texts, finishes = [''] * req['n'], [None] * req['n']
        while True:
            try:
                event = job.out.get(timeout=0.5)
            except queues.Empty:  # waiting for a turn: is the client still there?
                if client_gone(self.connection):
                    raise ConnectionAbortedError
                continue
            if event is None:
                return texts, finishes
            index, text, finish = event
            texts[index] += text
            finishes[index] = finish or finishes[index]
            if req['stream']:
                choice = {'text': text, 'index': index, 'logprobs': None, 'finish_reason': finish}
                self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
            elif client_gone(self.connection):
                raise ConnectionAbortedError

    def do_POST(self):
        app = self.app
        if self.path != '/v1/completions':
            return self.send_error_json(404, f"no route POST {self.path}: try POST /v1/completions")
        try:
            length = int(self.headers.get('Content-Length') or 0)
            if not 0 < length <= MAX_BODY:
                raise BadRequest(f"the body must be 1 byte to {MAX_BODY} bytes of JSON (Content-Length: {length})")
            body = self.rfile.read(length)
            req = check_request(body, app['cfg'], app['enc'], app['model'].config.block_size)
        except (BadRequest, ValueError, TimeoutError) as e:
            return self.send_error_json(getattr(e, 'status', 400), str(e), getattr(e, 'param', None),
                                        getattr(e, 'code', None))
        if req['seed'] is None:
            req['seed'] = random.randrange(2**63)
        job = Job(completion_events(app['model'], app['enc'], req, app['device']))
        if not app['worker'].submit(job):
            job.events.close()
            active, waiting = app['worker'].load()
            return self.send_error_json(429, f"the server is busy: {active} being written, {waiting} waiting "
                                             f"(--concurrency, --queue); retry in a moment")
        completion_id, created = f"cmpl-{random.getrandbits(64):016x}", int(time.time())
        head = {'id': completion_id, 'object': 'text_completion', 'created': created, 'model': app['cfg']['model_name']}
        if req['stream']:
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.end_headers()
        try:
            texts, finishes = self.relay_events(job, req, head)
            if req['stream']:
                if job.error:
                    self.wfile.write(f"data: {json.dumps(error_body(500, job.error))}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                return
        except OSError:  # the client went away (reset, broken pipe, a write timed out)
            self.close_connection = True
            return
        finally:
            job.cancelled = True  # the worker stops the story at its next turn if it is not done
        if job.error:
            return self.send_error_json(500, job.error)
        completion_tokens = req['completion_tokens']
        self.send_json(200, {**head, 'choices': [
            {'text': t, 'index': i, 'logprobs': None, 'finish_reason': f} for i, (t, f) in enumerate(zip(texts, finishes))],
            'usage': {'prompt_tokens': len(req['ids']), 'completion_tokens': completion_tokens,
                      'total_tokens': len(req['ids']) + completion_tokens}})


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, script=__file__)
    path = cfg['ckpt'] or os.path.join(cfg['out_dir'], 'best_model_params.pt')
    dev = pick_device(cfg['device'])
    model, _ = load_model(path, dev)
    model.eval()
    enc = get_tokenizer()
    if cfg['host'] not in ('127.0.0.1', 'localhost', '::1'):
        print(f"warning: listening on {cfg['host']}: anyone who can reach this machine on port {cfg['port']} can "
              f"use the model, its page and its API, with no password and no encryption", flush=True)
    try:
        server = ThreadingHTTPServer((cfg['host'], cfg['port']), Handler)
    except OSError as e:
        die(f"cannot listen on {cfg['host']}:{cfg['port']} ({e.strerror}): pick another --port or --host")
    server.daemon_threads = True
    Handler.app = dict(cfg=cfg, model=model, enc=enc, device=dev, created=int(time.time()),
                       worker=Worker(cfg['concurrency'], cfg['queue'], autocast(dev, pick_dtype(cfg['dtype'], dev))))
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {path} as {cfg['model_name']!r} on http://{bound_host}:{bound_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print()


# The page: plain HTML, CSS and JavaScript, nothing fetched from elsewhere. It posts to
# /v1/completions with stream: true and appends each server-sent chunk's text as it arrives;
# Stop aborts the request, which the server notices and stops the story.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SLM stories</title>
<style>
body { font: 17px/1.5 Georgia, serif; max-width: 44em; margin: 0 auto; padding: 1em; color: #222; background: #fdfbf7; }
h1 { font-size: 1.4em; margin: 0 0 .5em; }
textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5em; }
.controls { display: flex; flex-wrap: wrap; gap: .5em 1em; margin: .6em 0; font: 14px sans-serif; }
.controls label { display: flex; flex-direction: column; }
.controls input { width: 6.5em; font-size: 15px; padding: .2em; }
button { font: 16px sans-serif; padding: .45em 1.2em; margin-right: .5em; }
#story { white-space: pre-wrap; overflow-wrap: anywhere; margin-top: 1em; min-height: 6em; padding: .8em; background: #fff; border: 1px solid #ddd; }
#status { font: 13px sans-serif; color: #777; }
</style></head>
<body>
<h1>SLM stories</h1>
<textarea id="prompt" rows="3">Once upon a time</textarea>
<div class="controls">
  <label>temperature <input id="temperature" type="number" value="0.8" min="0" max="2" step="0.1"></label>
  <label>top-k <input id="top_k" type="number" value="200" min="0" step="1"></label>
  <label>top-p <input id="top_p" type="number" value="1" min="0.01" max="1" step="0.05"></label>
  <label>max new tokens <input id="max_tokens" type="number" value="300" min="1" max="MAX_TOKENS_LIMIT" step="1"></label>
  <label>seed (empty: random) <input id="seed" type="number" min="0" step="1"></label>
</div>
<button id="write">Write</button><button id="stop" disabled>Stop</button>
<span id="status"></span>
<div id="story"></div>
<script>
const $ = id => document.getElementById(id);
let controller = null;
$('write').onclick = async () => {
  const story = $('story'), status = $('status');
  const body = {prompt: $('prompt').value, stream: true, temperature: +$('temperature').value,
                top_k: +$('top_k').value, top_p: +$('top_p').value, max_tokens: +$('max_tokens').value};
  if ($('seed').value !== '') body.seed = +$('seed').value;
  story.textContent = body.prompt;
  status.textContent = 'writing...';
  $('write').disabled = true; $('stop').disabled = false;
  controller = new AbortController();
  try {
    const r = await fetch('/v1/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                              body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = '', finish = null;
    while (true) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split('\\n\\n');
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, '');
        if (data === '[DONE]') continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        story.textContent += choice.text;
        finish = choice.finish_reason || finish;
      }
    }
    status.textContent = finish === 'length' ? 'stopped at max new tokens' : 'the end';
  } catch (e) {
    status.textContent = e.name === 'AbortError' ? 'stopped' : 'error: ' + e.message;
  }
  $('write').disabled = false; $('stop').disabled = true;
};
$('stop').onclick = () => controller && controller.abort();
</script>
</body></html>
"""

if __name__ == '__main__':
    main()
