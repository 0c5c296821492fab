"""
A story playground and an OpenAI-compatible API, from one trained SLM model.

    python serve.py                                  # out/best_model_params.pt, on http://127.0.0.1:8000
    python serve.py --ckpt=export/slm-hf --port=8080 # any checkpoint, or an exported folder
    curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Once upon a time", "max_tokens": 100, "seed": 1, "stream": true}'

GET / is the page. POST /v1/completions takes OpenAI's prompt (text, token ids, or a list of
either), max_tokens, temperature, top_p, n, stream, stop, seed, logprobs and echo, plus top_k.
POST /v1/chat/completions takes messages instead: the story's prompt is the system messages'
text, then the last user message's. GET /v1/models lists the model, GET /health says how busy
the server is. docs/serve.md lists every field, what is refused, and the load figures. HTTP/1.1
keeps connections open (streams are chunked); --cors_origin lets pages from another origin call.

One worker thread runs the model through engine.Batch: each step writes the next token of every
story being written (up to --concurrency at once), a new request joins at the next step, further
ones wait in a queue of --queue, and past that get a 429. A client that goes away frees its row
at the next step. With a seed, a story written alone is the one sample.py writes with the same
seed and flags; with --batch_invariant it is the same whatever else is being written.
"""
import codecs
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
from data import get_tokenizer
from device import autocast, pick_device, pick_dtype
from engine import Batch, prompt_logprobs, sampling_problem

# -----------------------------------------------------------------------------
out_dir = 'out'            # serves out_dir/best_model_params.pt, the best checkpoint train.py saved
ckpt = ''                  # a checkpoint file (or exported folder) to serve instead
host = '127.0.0.1'         # the address to listen on: this machine only; 0.0.0.0 = every network
port = 8000                # 0 = any free port (printed); in [0, 65535]
model_name = 'slm'         # the model's id in the API (/v1/models; a request's "model" must match)
concurrency = 16           # stories written at once, one batched step for all; in [1, inf)
batch_invariant = False    # run every step at all --concurrency rows: a seeded story then does not depend on the load
queue = 16                 # requests that may wait for a turn; past that a 429; in [0, inf)
max_tokens_limit = 1024    # the most tokens a request may ask for, per story; in [1, inf)
cors_origin = ''           # the origin whose pages may call the API (http://localhost:3000, or *); '' = none
device = 'auto'            # auto = cuda, else mps, else cpu
dtype = 'auto'             # float32, bfloat16 or float16; auto = bf16/fp16 on GPUs, fp32 elsewhere
# -----------------------------------------------------------------------------

MAX_BODY = 1 << 20         # bytes of JSON a request may send
MAX_STOPS = 4              # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 256       # characters per stop sequence (each token checks them all)
MAX_PROMPTS = 16           # prompts in one completion request
MAX_LOGPROBS = 5           # the most likely tokens logprobs may ask for, as OpenAI allows
ROLES = ('system', 'developer', 'user', 'assistant')


class BadRequest(Exception):
    """A request the API refuses: 400 (or status) with an OpenAI-style error body."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def read_json(body):
    """The request body as a dict, or BadRequest."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e}): send a JSON object") from None
    except RecursionError:
        raise BadRequest("the body nests too deeply: send a flat JSON object") from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object, e.g. {\"prompt\": \"Once upon a time\"}")
    return req


def prompt_ids(prompt, enc, block_size, param='prompt'):
    """A completion's prompts as token id lists: prompt is a string, a list of token ids, or a
    list of either. param: the field a prompt too long is blamed on."""
    is_ids = lambda p: isinstance(p, list) and p and all(type(t) is int for t in p)
    prompts = [prompt] if isinstance(prompt, str) or is_ids(prompt) else prompt
    if not (isinstance(prompts, list) and 0 < len(prompts) <= MAX_PROMPTS
            and all(isinstance(p, str) or is_ids(p) for p in prompts)):
        raise BadRequest(f"prompt must be a string, a list of token ids, or a list of 1 to {MAX_PROMPTS} of either",
                         param='prompt')
    ids = [enc.encode(p, allowed_special={'<|endoftext|>'}) if isinstance(p, str) else p for p in prompts]
    for p in ids:
        if not all(0 <= t < enc.n_vocab for t in p):
            raise BadRequest(f"token ids must be from 0 to {enc.n_vocab - 1} (GPT-2's BPE)", param='prompt')
        if len(p) > block_size:
            raise BadRequest(f"the prompt is {len(p)} tokens; this model reads at most {block_size}: shorten it",
                             param=param)
    return ids


def chat_prompt(messages):
    """A chat's story prompt: the system (and developer) messages' text, then the last user
    message's, a blank line between. The model writes stories, not replies: earlier turns and
    the assistant's are not read."""
    if not (isinstance(messages, list) and messages):
        raise BadRequest("messages must be a non-empty list of {\"role\": ..., \"content\": ...}", param='messages')
    texts = {role: [] for role in ROLES}
    for m in messages:
        role, content = (m.get('role'), m.get('content')) if isinstance(m, dict) else (None, None)
        if role not in ROLES:
            raise BadRequest(f"role {json.dumps(role)} is not one of {', '.join(ROLES)}", param='messages')
        if isinstance(content, list):  # content parts: their text
            content = ''.join(p['text'] for p in content if isinstance(p, dict) and isinstance(p.get('text'), str))
        if not isinstance(content, str) and not (role == 'assistant' and content is None):
            raise BadRequest(f"a {role} message's content must be text", param='messages')
        texts[role].append(content)
    if not texts['user']:
        raise BadRequest("messages need a user message: its text begins the story", param='messages')
    return '\n\n'.join(texts['system'] + texts['developer'] + texts['user'][-1:])


def check_request(body, cfg, enc, block_size, chat=False):
    """The completion (or chat) request as a dict of checked values, or BadRequest naming the field."""
    req = read_json(body)

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
    if chat:
        ids = prompt_ids(chat_prompt(req.get('messages')), enc, block_size, param='messages')
    else:
        ids = prompt_ids(req.get('prompt', ''), enc, block_size)
    stop = req.get('stop')
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (isinstance(stops, list) and len(stops) <= MAX_STOPS
                                  and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise BadRequest(f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                         f"{MAX_STOPS} of them", param='stop')
    number, limit = (int, float), cfg['max_tokens_limit']
    echo = False if chat else field('echo', (bool,), False, rule="true or false")
    tokens = 'max_completion_tokens' if chat and req.get('max_completion_tokens') is not None else 'max_tokens'
    checked = dict(
        chat=chat, ids=ids, stops=stops or [], echo=echo,
        max_tokens=field(tokens, (int,), 16, lambda v: int(not echo) <= v <= limit,
                         f"a whole number from {int(not echo)} to {limit}"),
        temperature=field('temperature', number, 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
        top_p=field('top_p', number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=field('top_k', (int,), None, lambda v: v >= 0, "a whole number >= 0 (0 = all tokens)"),
        n=field('n', (int,), 1, lambda v: 1 <= v <= 8, "a whole number from 1 to 8"),
        stream=field('stream', (bool,), False, rule="true or false"),
        seed=field('seed', (int,), None, lambda v: 0 <= v < 2**63, "a whole number from 0 to 2**63 - 1"),
        logprobs=None if chat else field('logprobs', (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS,
                                         f"a whole number from 0 to {MAX_LOGPROBS}"),
        usage_chunk=isinstance(req.get('stream_options'), dict) and req['stream_options'].get('include_usage') is True)
    refused = [('best_of', lambda v: v not in (None, 1), ''), ('suffix', lambda v: v is not None, ''),
               ('tools', lambda v: bool(v), ''), ('functions', lambda v: bool(v), ''),
               ('logprobs', lambda v: chat and v not in (None, False), ' in chat: ask /v1/completions'),
               ('echo', lambda v: checked['stream'] and v, ' with stream: ask without stream'),
               ('logprobs', lambda v: checked['stream'] and v is not None, ' with stream: ask without stream')]
    for name, unsupported, hint in refused:
        if unsupported(req.get(name)):
            raise BadRequest(f"{name} is not supported by this server{hint}", param=name)
    problem = sampling_problem(checked['temperature'], checked['top_k'], checked['top_p'])
    if problem:
        raise BadRequest(problem)
    if checked['seed'] is None:
        checked['seed'] = random.randrange(2**63)
    return checked


def held_back(text, stops):
    """How many characters at the end of text could start a stop sequence: they wait until the
    next piece says whether it is one."""
    return max([k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])], default=0)


class Choice:
    """One completion being written: its text as the tokens come (characters that could begin a
    stop sequence wait for the next token), its logprobs if asked for, and why it ended."""

    def __init__(self, index, enc, req):
        self.index, self.enc, self.stops, self.top = index, enc, req['stops'], req['logprobs']
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self.text, self.start, self.sent, self.finish, self.tokens, self.cut = '', 0, 0, None, 0, False
        self.logprobs = None if self.top is None else {'tokens': [], 'token_logprobs': [], 'top_logprobs': [],
                                                       'text_offset': []}

    def token_text(self, token):
        return self.enc.decode_single_token_bytes(token).decode('utf-8', 'replace') if token < self.enc.n_vocab else ''

    def add(self, token, logprobs):
        """token's entry in the logprobs (logprobs: the distribution it came from, or None) and its text."""
        if self.logprobs is not None:
            lp = self.logprobs
            lp['tokens'].append(self.token_text(token))
            lp['text_offset'].append(len(self.text))
            lp['token_logprobs'].append(None if logprobs is None else logprobs[token].item())
            if logprobs is None:
                lp['top_logprobs'].append(None)
            else:  # the most likely `top`, and the token itself, as OpenAI's legacy logprobs
                values, ids = logprobs.topk(self.top)
                top = {self.token_text(t): v for t, v in zip(ids.tolist(), values.tolist())}
                top[self.token_text(token)] = logprobs[token].item()
                lp['top_logprobs'].append(top)
        if token != self.enc.eot_token and token < self.enc.n_vocab:
            self.text += self.decoder.decode(self.enc.decode_single_token_bytes(token))

    def echo(self, ids, logprobs):
        """The prompt first, each token scored after the ones before it (the first: null)."""
        for i, token in enumerate(ids):
            self.add(token, logprobs[i - 1] if i and logprobs is not None else None)
        self.text += self.decoder.decode(b'', final=True)
        self.start = self.sent = len(self.text)
        return self.text

    def feed(self, token, logits):
        """The next written token; returns the text now safe to send ('' if none)."""
        self.tokens += 1
        self.add(token, None if self.logprobs is None else torch.log_softmax(logits.float(), dim=-1))
        if token == self.enc.eot_token:
            self.finish = 'stop'
        cuts = [i for i in (self.text.find(s, max(self.start, self.sent - len(s))) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.finish, self.cut = self.text[:min(cuts)], 'stop', True
            if self.logprobs is not None:  # the tokens that begin past the cut go too
                keep = sum(o < len(self.text) for o in self.logprobs['text_offset'])
                self.logprobs = {k: v[:keep] for k, v in self.logprobs.items()}
        ready = len(self.text) if self.finish else len(self.text) - held_back(self.text[self.start:], self.stops)
        piece, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        return piece

    def end(self):
        """It ended (<|endoftext|>, a stop sequence, or max_tokens): the rest of its text."""
        if not self.cut:  # a character cut short by the end: U+FFFD, as sample.py prints it
            self.text += self.decoder.decode(b'', final=True)
        self.finish = self.finish or 'length'
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


class Job:
    """One request: each prompt n times, written one after another from one random stream
    seeded by the request's seed (as sample.py's --num_samples). The worker puts events (index,
    text, finish_reason) into out, then None; cancelled (its client went away) stops it; error
    says what broke it, if something did."""

    def __init__(self, req, device):
        self.req, self.choices, self.seq, self.choice = req, {}, None, None
        self.generator = torch.Generator(device=device).manual_seed(req['seed'])
        self.todo = collections.deque((i * req['n'] + j, ids) for i, ids in enumerate(req['ids']) for j in range(req['n']))
        self.out, self.cancelled, self.error = queues.SimpleQueue(), False, None


class Worker:
    """Runs the model (in the main thread: see main). Each round starts the next story of any
    job without one, then runs one Batch step for every story being written. Up to concurrency
    jobs write at once; waiting jobs start as active ones finish."""

    def __init__(self, model, enc, cfg, ctx):
        self.model, self.enc, self.cfg, self.ctx = model, enc, cfg, ctx
        self.concurrency, self.queue_size = cfg['concurrency'], cfg['queue']
        self.batch = Batch(model, self.concurrency, cfg['batch_invariant'])
        self.waiting, self.active = collections.deque(), []
        self.changed = threading.Condition()

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
                try:
                    for job in jobs:
                        if job.cancelled or (job.seq is None and not self.start_next(job)):
                            self.finish(job)
                    for seq, token, logits in self.batch.step():
                        self.take(seq.job, token, logits)
                except Exception as e:  # a bug, or the device failing: these requests fail, the server goes on
                    print(f"error: a story failed: {e!r}", file=sys.stderr, flush=True)
                    for job in list(self.active):
                        job.error, job.seq = f"generation failed ({e.__class__.__name__})", None
                        self.finish(job)
                    self.batch = Batch(self.model, self.concurrency, self.cfg['batch_invariant'])

    def start_next(self, job):
        """Start job's next story in the batch (an echo with max_tokens 0 needs no step);
        False once it has none left."""
        req = job.req
        while job.todo:
            index, ids = job.todo.popleft()
            job.choice = choice = Choice(index, self.enc, req)
            if req['echo']:
                scores = prompt_logprobs(self.model, ids) if req['logprobs'] is not None and len(ids) > 1 else None
                job.out.put((index, choice.echo(ids, scores), None))
            if req['max_tokens'] == 0:
                self.end_choice(job)
                continue
            # a story begins after <|endoftext|>, as sample.py's do; the window keeps the last block_size tokens
            context = ([self.enc.eot_token] + ids)[-self.model.config.block_size:]
            job.seq = self.batch.add(context, req['max_tokens'], req['temperature'], req['top_k'], req['top_p'],
                                     job.generator)
            job.seq.job = job
            return True
        return False

    def take(self, job, token, logits):
        """job's story got its next token."""
        piece = job.choice.feed(token, logits)
        if piece:
            job.out.put((job.choice.index, piece, None))
        if job.choice.finish or job.seq.left == 0:
            if job.seq.left > 0:  # it ended before max_tokens: it is still in the batch
                self.batch.remove(job.seq)
            job.seq = None
            self.end_choice(job)

    def end_choice(self, job):
        piece = job.choice.end()
        if piece:
            job.out.put((job.choice.index, piece, None))
        job.choices[job.choice.index] = job.choice
        job.out.put((job.choice.index, '', job.choice.finish))

    def finish(self, job):
        if job.seq is not None and job.seq.left > 0:
            self.batch.remove(job.seq)
        job.seq = None
        job.out.put(None)
        with self.changed:
            self.active.remove(job)


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


def stream_chunk(req, head, index, text, finish):
    """One server-sent chunk in OpenAI's layout: a completion's text, or a chat's delta."""
    if not req['chat']:
        return {**head, 'choices': [{'text': text, 'index': index, 'logprobs': None, 'finish_reason': finish}]}
    delta = {} if finish else {'content': text} if text else {'role': 'assistant', 'content': ''}
    return {**head, 'choices': [{'index': index, 'delta': delta, 'logprobs': None, 'finish_reason': finish}]}


def response(req, head, job, texts):
    """The whole answer of a request that did not stream."""
    completion_tokens = sum(c.tokens for c in job.choices.values())
    prompt_tokens = sum(len(ids) for ids in req['ids'])
    choices = [job.choices[i] for i in range(len(texts))]
    if req['chat']:
        choices = [{'index': c.index, 'message': {'role': 'assistant', 'content': texts[c.index]}, 'logprobs': None,
                    'finish_reason': c.finish} for c in choices]
    else:
        choices = [{'text': texts[c.index], 'index': c.index, 'logprobs': c.logprobs, 'finish_reason': c.finish}
                   for c in choices]
    return {**head, 'choices': choices, 'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                                                  'total_tokens': prompt_tokens + completion_tokens}}


class Handler(BaseHTTPRequestHandler):
    server_version = 'SLM'
    protocol_version = 'HTTP/1.1'  # keep-alive: a client's next request reuses its connection
    timeout = 60  # seconds a socket read or write may hang (and an idle connection stays open)
    app = None  # set by main(): the model, tokenizer, worker and config

    def log_message(self, fmt, *args):  # one short line per request on stderr
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def end_headers(self):
        origin = self.app['cfg']['cors_origin']
        if origin:  # CORS: pages from that origin may read the answers
            self.send_header('Access-Control-Allow-Origin', origin)
            if origin != '*':
                self.send_header('Vary', 'Origin')
        super().end_headers()

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

    def send_event(self, data):
        """One server-sent event, as one chunk of the chunked answer."""
        event = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        self.wfile.write(b'%x\r\n%s\r\n' % (len(event), event))
        self.wfile.flush()

    def do_OPTIONS(self):  # a browser's CORS preflight; without --cors_origin the browser then refuses
        self.send_response(204)
        self.send_header('Access-Control-Allow-Methods', 'GET, POST, OPTIONS')
        self.send_header('Access-Control-Allow-Headers', 'Content-Type, Authorization')
        self.send_header('Access-Control-Max-Age', '86400')
        self.send_header('Content-Length', '0')
        self.end_headers()

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
        streams; returns each choice's text. ConnectionAbortedError (an OSError) if the client
        goes away."""
        texts = [''] * (len(req['ids']) * req['n'])
        if req['stream'] and req['chat']:
            for index in range(len(texts)):
                self.send_event(stream_chunk(req, head, index, '', None))  # the role comes first
        while True:
            try:
                event = job.out.get(timeout=0.5)
            except queues.Empty:  # waiting for a turn: is the client still there?
                if client_gone(self.connection):
                    raise ConnectionAbortedError
                continue
            if event is None:
                return texts
            index, text, finish = event
            texts[index] += text
            if req['stream']:
                self.send_event(stream_chunk(req, head, index, text, finish))
            elif client_gone(self.connection):
                raise ConnectionAbortedError

    def do_POST(self):
        app = self.app
        if self.path not in ('/v1/completions', '/v1/chat/completions'):
            self.close_connection = True  # its body is not read
            return self.send_error_json(404, f"no route POST {self.path}: try /v1/completions or /v1/chat/completions")
        try:
            length = int(self.headers.get('Content-Length') or 0)
            if not 0 < length <= MAX_BODY:
                self.close_connection = True  # the body is not read: the connection cannot serve another request
                raise BadRequest(f"the body must be 1 byte to {MAX_BODY} bytes of JSON (Content-Length: {length})")
            body = self.rfile.read(length)
            req = check_request(body, app['cfg'], app['enc'], app['model'].config.block_size,
                                chat=self.path == '/v1/chat/completions')
        except (BadRequest, ValueError, TimeoutError) as e:
            self.close_connection = self.close_connection or not isinstance(e, BadRequest)
            return self.send_error_json(getattr(e, 'status', 400), str(e), getattr(e, 'param', None),
                                        getattr(e, 'code', None))
        job = Job(req, app['device'])
        if not app['worker'].submit(job):
            active, waiting = app['worker'].load()
            return self.send_error_json(429, f"the server is busy: {active} being written, {waiting} waiting "
                                             f"(--concurrency, --queue); retry in a moment")
        kind = ('chatcmpl', 'chat.completion') if req['chat'] else ('cmpl', 'text_completion')
        head = {'id': f"{kind[0]}-{random.getrandbits(64):016x}", 'object': kind[1] + ('.chunk' if req['stream'] and
                req['chat'] else ''), 'created': int(time.time()), 'model': app['cfg']['model_name']}
        if req['stream']:
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.send_header('Transfer-Encoding', 'chunked')
            self.end_headers()
        try:
            texts = self.relay_events(job, req, head)
            if req['stream']:
                if job.error:
                    self.send_event(error_body(500, job.error))
                elif req['usage_chunk']:
                    self.send_event({**response(req, head, job, texts), 'choices': []})
                self.send_event('[DONE]')
                self.wfile.write(b'0\r\n\r\n')  # the chunked answer's end
                return
        except OSError:  # the client went away (reset, broken pipe, a write timed out)
            self.close_connection = True
            return
        finally:
            job.cancelled = True  # the worker stops the story at its next turn if it is not done
        if job.error:
            return self.send_error_json(500, job.error)
        self.send_json(200, response(req, head, job, texts))


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream still being written does not hold up Ctrl-C
    request_queue_size = 128  # connections not yet accepted: past socketserver's 5, a burst of clients got resets


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
        server = Server((cfg['host'], cfg['port']), Handler)
    except OSError as e:
        die(f"cannot listen on {cfg['host']}:{cfg['port']} ({e.strerror}): pick another --port or --host")
    worker = Worker(model, enc, cfg, autocast(dev, pick_dtype(cfg['dtype'], dev)))
    Handler.app = dict(cfg=cfg, model=model, enc=enc, device=dev, created=int(time.time()), worker=worker)
    bound_host, bound_port = server.server_address[:2]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"serving {path} as {cfg['model_name']!r} on http://{bound_host}:{bound_port}/ (Ctrl-C stops)", flush=True)
    try:
        # the model runs in the thread that loaded it: OpenMP keeps a team of threads per thread
        # that runs parallel ops, and a second team (more threads than cores) makes every team
        # wait for sleeping threads at each of a step's many small parallel ops: 1.7x slower steps
        worker.run()
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
