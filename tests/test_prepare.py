"""prepare.py: exact tokens, meta.json, idempotence, atomic writes, bad input and flags, the offline
error, no orphan workers."""
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from data import EOT_TOKEN, encode_stories, get_tokenizer, open_split, read_chunks, read_stories, split_stories
import prepare
from conftest import error_of, one_line_error, run_script, start_script

SEP = '<|endoftext|>'


def stripped_stories(path):
    """The expected stories, computed the obvious way (the whole file at once)."""
    with open(path, encoding='utf-8') as f:
        return [s.strip() for s in f.read().split(SEP) if s.strip()]


def expected_tokens(stories):
    enc = get_tokenizer()
    return np.array([t for s in stories for t in enc.encode_ordinary(s) + [EOT_TOKEN]], dtype=np.uint16)


def files_args(stories_dir, out_dir, train='train.txt', val='validation.txt'):
    return [f'--train_files={stories_dir / train}', f'--val_files={stories_dir / val}', f'--out_dir={out_dir}']


@pytest.fixture(scope='module')
def prepared(stories_dir, tmp_path_factory):
    """The real sample prepared once through the command line."""
    out = tmp_path_factory.mktemp('prepared')
    result = run_script('prepare.py', *files_args(stories_dir, out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_bins_decode_to_the_stripped_stories_joined_by_eot(prepared, stories_dir):
    out, _ = prepared
    enc = get_tokenizer()
    for split, name in (('train', 'train.txt'), ('val', 'validation.txt')):
        stories = stripped_stories(stories_dir / name)
        tokens = np.fromfile(out / f'{split}.bin', dtype=np.uint16)
        assert enc.decode(tokens.tolist()) == SEP.join(stories) + SEP
        assert np.array_equal(tokens, expected_tokens(stories))  # encode_ordinary per story, then EOT
        assert (tokens == EOT_TOKEN).sum() == len(stories)
        assert tokens[-1] == EOT_TOKEN


def test_meta_describes_the_bins(prepared, stories_dir):
    out, stdout = prepared
    meta = json.loads((out / 'meta.json').read_text())
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot_token'], meta['dtype']) == ('gpt2', 50257, 50256, 'uint16')
    assert meta['sources'] == {'train': [str(stories_dir / 'train.txt')], 'val': [str(stories_dir / 'validation.txt')]}
    for split, name in (('train', 'train.txt'), ('val', 'validation.txt')):
        info, stories = meta['splits'][split], stripped_stories(stories_dir / name)
        data = (out / info['file']).read_bytes()
        assert info['file'] == f'{split}.bin'
        assert info['tokens'] * 2 == len(data)
        assert info['stories'] == len(stories)
        assert info['text_bytes'] == sum(len(s.encode('utf-8')) for s in stories)
        assert info['sha256'] == hashlib.sha256(data).hexdigest()
        assert len(open_split(str(out), split, 50257)) == info['tokens']
    assert meta['splits']['train']['stories'] == 2800 and meta['splits']['val']['stories'] == 317
    total = sum(s['tokens'] for s in meta['splits'].values())
    assert f"done: 3,117 stories, {total:,} tokens" in stdout  # the summary line


def test_several_files_and_one_process_give_the_same_tokens(stories_dir, tmp_path):
    train = [str(stories_dir / 'sample5.txt'), str(stories_dir / 'validation.txt')]
    val = [str(stories_dir / 'sample5.txt')]
    one = prepare.prepare_files(train, val, str(tmp_path / 'one'), num_proc=1)
    two = prepare.prepare_files(train, val, str(tmp_path / 'two'), num_proc=2)
    assert one['splits'] == two['splits']
    tokens = np.fromfile(tmp_path / 'two' / 'train.bin', dtype=np.uint16)
    assert np.array_equal(tokens, expected_tokens(stripped_stories(train[0]) + stripped_stories(train[1])))


def test_chunks_never_cut_a_story_or_a_character(tmp_path):
    # no trailing separator, CRLF, a BOM, blank lines, multi-byte characters, one long story
    text = ('\ufeffÉmile and the 🐉 dragon.\r\n<|endoftext|>\r\n\n  Zoë said "héllo" — ünïcode.\n'
            '<|endoftext|>\n' + 'A very long story. ' * 50 + '\n<|endoftext|>\n\n<|endoftext|>\nThe end 🎉')
    path = tmp_path / 'odd.txt'
    path.write_bytes(text.encode('utf-8'))
    expected = [s.strip() for s in text.removeprefix('\ufeff').split(SEP) if s.strip()]
    assert len(expected) == 4
    assert read_stories(str(path)) == expected
    for size in (1, 2, 3, 7, 13, 64, 1000):
        got = [s for chunk in read_chunks(str(path), size=size) for s in split_stories(chunk)]
        assert got == expected, size


def test_encode_stories_matches_encode_ordinary():
    stories = ['Once upon a time.', 'Zoë 🐉  spaces   \n\n and lines', 'x' * 3000, 'a' + SEP + 'b', '']
    for batch in (stories[:3], stories, [], ['lone \ud800 surrogate']):
        enc = get_tokenizer()
        want = [t for s in batch for t in enc.encode_ordinary(s) + [EOT_TOKEN]]
        got = encode_stories(batch)
        assert got.dtype == np.uint16 and got.tolist() == want


def test_rerun_is_a_noop_and_force_rebuilds(stories_dir, tmp_path):
    out = tmp_path / 'data'
    args = files_args(stories_dir, out, train='sample5.txt', val='sample5.txt')
    assert run_script('prepare.py', *args).returncode == 0
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    again = run_script('prepare.py', *args)
    assert again.returncode == 0 and 'already prepared' in again.stdout and 'done:' not in again.stdout
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before
    forced = run_script('prepare.py', *args, '--force')
    assert forced.returncode == 0 and 'done:' in forced.stdout
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    assert sorted(after) == ['meta.json', 'train.bin', 'val.bin'] and after != before
    # other sources into the same folder: refused unless --force
    other = files_args(stories_dir, out, train='validation.txt', val='sample5.txt')
    with pytest.raises(SystemExit, match='already holds data prepared from other sources.*--force'):
        prepare.main(other)
    assert prepare.main(other + ['--force']) is None
    assert prepare.complete_meta(str(out))['splits']['train']['stories'] == 317
    # a truncated bin is not complete: a plain re-run rebuilds it
    with open(out / 'val.bin', 'r+b') as f:
        f.truncate(10)
    assert prepare.complete_meta(str(out)) is None
    prepare.main(other)
    assert len(open_split(str(out), 'val')) == prepare.complete_meta(str(out))['splits']['val']['tokens']


def test_interrupt_while_swapping_files_leaves_nothing_complete(stories_dir, tmp_path, monkeypatch):
    out = str(tmp_path / 'data')
    sample = [str(stories_dir / 'sample5.txt')]
    prepare.prepare_files(sample, sample, out, num_proc=1)  # an older complete run
    real_replace, calls = os.replace, []

    def replace_then_interrupt(src, dst):  # Ctrl-C after train.bin was swapped in, before val.bin
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace_then_interrupt)
    with pytest.raises(SystemExit) as e:
        prepare.main(files_args(stories_dir, out, train='validation.txt', val='sample5.txt') + ['--force'])
    monkeypatch.undo()
    assert 'interrupted' in str(e.value.code)
    assert sorted(os.listdir(out)) == ['train.bin', 'val.bin']  # no meta.json, no temp files
    assert prepare.complete_meta(out) is None
    with pytest.raises(SystemExit, match='prepare.py'):
        open_split(out, 'train')


def test_interrupt_while_tokenizing_keeps_the_old_complete_output(stories_dir, tmp_path, monkeypatch):
    out = str(tmp_path / 'data')
    sample = [str(stories_dir / 'sample5.txt')]
    old = prepare.prepare_files(sample, sample, out, num_proc=1)
    real_write_split = prepare.write_split

    def write_then_interrupt(name, results, path, total=None):
        def interrupted():
            yield next(results)
            raise KeyboardInterrupt
        return real_write_split(name, interrupted(), path, total)

    monkeypatch.setattr(prepare, 'write_split', write_then_interrupt)
    train = [str(stories_dir / 'validation.txt')]
    with pytest.raises(KeyboardInterrupt):
        prepare.write_dataset(out, {'train': (prepare._encode_text, read_chunks(train[0], size=4096), None),
                                    'val': (prepare._encode_text, read_chunks(sample[0]), None)},
                              {'train': train, 'val': sample}, num_proc=2)
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'val.bin']  # temp files removed
    assert prepare.complete_meta(out) == old  # the old run is untouched and still complete


def test_killed_run_leaves_no_meta_and_the_next_run_recovers(stories_dir, tmp_path):
    out = tmp_path / 'data'
    # SIGKILL (no cleanup possible) after the first piece of train.bin reached the disk
    code = ("import os, signal, sys, prepare\n"
            "real = prepare.write_split\n"
            "def killed(name, results, path, total=None):\n"
            "    def gen():\n"
            "        yield next(results)\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(name, gen(), path, total)\n"
            "prepare.write_split = killed\n"
            "prepare.main(sys.argv[1:])\n")
    args = files_args(stories_dir, out) + ['--num_proc=1']
    killed = run_script('-c', code, *args)
    assert killed.returncode == -signal.SIGKILL
    left = os.listdir(out)
    assert 'meta.json' not in left and any('.tmp' in name for name in left), left
    again = run_script('prepare.py', *args)
    assert again.returncode == 0 and 'interrupted run' in again.stdout
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'val.bin']
    assert prepare.complete_meta(str(out))['splits']['train']['stories'] == 2800


def bad_inputs(tmp_path, stories_dir):
    good = str(stories_dir / 'sample5.txt')
    (tmp_path / 'empty.txt').write_bytes(b'')
    (tmp_path / 'nostories.txt').write_text(f'\n{SEP}\n   \n{SEP}\n\n')
    (tmp_path / 'latin1.txt').write_bytes(f'A fine story.\n{SEP}\nCaf'.encode() + b'\xe9 au lait.\n')
    return {
        'missing file': ([f'--train_files={tmp_path}/nope.txt', f'--val_files={good}'], 'not found'),
        'empty file': ([f'--train_files={good}', f'--val_files={tmp_path}/empty.txt'], 'is empty'),
        'no stories': ([f'--train_files={good}', f'--val_files={tmp_path}/nostories.txt'], 'holds no stories'),
        'invalid utf-8': ([f'--train_files={good}', f'--val_files={tmp_path}/latin1.txt'],
                          f'not valid UTF-8 (bad byte at offset {len(f"A fine story.{chr(10)}{SEP}{chr(10)}Caf")})'),
    }


@pytest.mark.parametrize('case', ['missing file', 'empty file', 'no stories', 'invalid utf-8'])
def test_bad_input_gives_one_line_and_no_output(case, tmp_path, stories_dir):
    args, message = bad_inputs(tmp_path, stories_dir)[case]
    out = tmp_path / 'out' / 'data'
    assert message in one_line_error(run_script('prepare.py', *args, f'--out_dir={out}'))
    assert not (tmp_path / 'out').exists()  # found while tokenizing: the folders made are removed again


def test_bad_input_on_force_keeps_the_old_output(tmp_path, stories_dir):
    out = tmp_path / 'out'
    good = str(stories_dir / 'sample5.txt')
    assert run_script('prepare.py', f'--train_files={good}', f'--val_files={good}', f'--out_dir={out}').returncode == 0
    old = prepare.complete_meta(str(out))
    (tmp_path / 'bad.txt').write_bytes(b'\xff\xfe broken')
    args = [f'--train_files={good}', f'--val_files={tmp_path}/bad.txt', f'--out_dir={out}', '--force']
    assert 'UTF-8' in one_line_error(run_script('prepare.py', *args))
    assert prepare.complete_meta(str(out)) == old and sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'val.bin']


# Bad flags, run in-process: {tmp} is the test's tmp_path (holding afile and adir), {good} a good
# story file. Every case starts from good local files and --out_dir={tmp}/out; later flags win.
GOOD_FLAGS = ['--train_files={good}', '--val_files={good}', '--out_dir={tmp}/out']
HUB = ['--train_files=', '--val_files=']  # no local files: the hub route
BAD_FLAGS = {
    'negative num_proc': (['--num_proc=-3'], '--num_proc=-3 is out of range'),
    'huge num_proc': (['--num_proc=100000'], '--num_proc=100000 is out of range'),
    'float num_proc': (['--num_proc=2.5'], 'num_proc must be int'),
    'word num_proc': (['--num_proc=many'], 'num_proc must be int'),
    'int force': (['--force=2'], 'force must be bool'),
    'unknown flag': (['--bogus=1'], 'unknown option --bogus'),
    'out_dir is a file': (['--out_dir={tmp}/afile'], 'afile is a file, not a folder'),
    'out_dir under a file': (['--out_dir={tmp}/afile/data'], 'cannot be made: {tmp}/afile is a file'),
    'empty out_dir': (['--out_dir='], '--out_dir is empty'),
    'NUL in out_dir': (['--out_dir={tmp}/o\0ut'], 'out_dir holds a NUL byte'),
    'train_files is a folder': (['--train_files={tmp}/adir'], '{tmp}/adir is not a file'),
    'val_files is a folder': (['--val_files={tmp}/adir'], '{tmp}/adir is not a file'),
    'missing val file': (['--val_files={good},{tmp}/nope.txt'], '{tmp}/nope.txt not found'),
    'only commas': (['--train_files=,,'], 'give at least one file to each'),
    'only train_files': (['--val_files='], 'give both --train_files and --val_files'),
    'dataset is a file': (HUB + ['--dataset={tmp}/afile'], 'afile is a file, not a dataset'),
    'empty dataset': (HUB + ['--dataset= '], '--dataset is empty'),
    'hub route, out_dir is a file': (HUB + ['--out_dir={tmp}/afile'], 'afile is a file, not a folder'),
    'hub route, negative num_proc': (HUB + ['--num_proc=-1'], '--num_proc=-1 is out of range'),
}


def snapshot(folder):
    """Every path under folder with its size and mtime: what "nothing written" compares."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*'))


@pytest.mark.parametrize('args, message', BAD_FLAGS.values(), ids=list(BAD_FLAGS))
def test_bad_flag_stops_before_any_work_and_writes_nothing(args, message, tmp_path, stories_dir, monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError('work began before every flag was checked')
    for name in ('get_tokenizer', 'read_chunks', 'hub_reachable', 'load_hub', 'write_dataset'):
        monkeypatch.setattr(prepare, name, work)
    (tmp_path / 'afile').write_text('not a folder')
    (tmp_path / 'adir').mkdir()
    before = snapshot(tmp_path)
    fill = dict(tmp=tmp_path, good=stories_dir / 'sample5.txt')
    err = error_of(prepare.main, [a.format(**fill) for a in GOOD_FLAGS + args])
    assert message.format(**fill) in err
    assert snapshot(tmp_path) == before  # no out_dir, no temp files, the file in the way untouched


def test_read_only_out_dir_stops_before_any_work(readonly_dir, stories_dir, tmp_path, monkeypatch):
    good = str(stories_dir / 'sample5.txt')
    files = [f'--train_files={good}', f'--val_files={good}']
    for out in (readonly_dir, readonly_dir / 'data'):
        err = error_of(prepare.main, files + [f'--out_dir={out}'])
        assert f'{readonly_dir} is not writable' in err
    assert os.listdir(readonly_dir) == []
    # an up-to-date folder is not written, so a read-only one (like shared data) is a no-op, not an error
    done = str(tmp_path / 'done')
    prepare.main(files + [f'--out_dir={done}', '--num_proc=1'])
    monkeypatch.setattr(prepare, 'check_writable', lambda *args, **kwargs: pytest.fail('checked needlessly'))
    prepare.main(files + [f'--out_dir={done}'])


def closed_port():
    """A local port nobody listens on (bound, never listening): connecting is refused at once."""
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    return s, s.getsockname()[1]


def offline_env(tmp_path, **extra):
    """run_script's env: no proxy and no HF_ variable (None removes one); an empty Hugging Face cache."""
    env = {k: None for k in os.environ if 'proxy' in k.lower() or k.startswith('HF_')}
    env.update(HF_HOME=str(tmp_path / 'hf-home'), **extra)
    return env


def test_unreachable_hub_fails_fast_naming_the_offline_routes(tmp_path):
    sock, port = closed_port()
    with sock:  # the hub "lives" on a refused local port: the network is never touched
        env = offline_env(tmp_path, HF_ENDPOINT=f'http://127.0.0.1:{port}')
        t0 = time.time()
        result = run_script('prepare.py', f'--out_dir={tmp_path}/data', env=env)
    err = one_line_error(result)
    assert time.time() - t0 < 20  # not datasets' ~25 s of retries
    assert 'cannot reach the Hugging Face hub' in err
    assert '--train_files=' in err and '--val_files=' in err and 'TIKTOKEN_CACHE_DIR' in err
    assert not (tmp_path / 'data').exists()


def cache_like_an_online_run(stories_dir, tmp_path, hf_home):
    """What datasets leaves in HF_HOME after loading roneneldan/TinyStories from the hub once
    (Arrow files under datasets/roneneldan___tiny_stories/default/<version>/<hash>/), made
    here from the sample stories with the json builder the hub files are read with."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json
    files = {}
    for split, name in (('train', 'train.txt'), ('validation', 'validation.txt')):
        files[split] = [str(tmp_path / f'{split}.jsonl')]
        rows = [json.dumps({'text': s}) for s in stripped_stories(stories_dir / name)]
        (tmp_path / f'{split}.jsonl').write_text('\n'.join(rows) + '\n')
    builder = Json(cache_dir=str(tmp_path / 'scratch'), dataset_name='tiny_stories', config_name='default',
                   data_files=DataFilesDict.from_patterns(files), hash='0123abcd')
    builder.download_and_prepare()
    target = hf_home / 'datasets' / 'roneneldan___tiny_stories' / 'default' / '0.0.0'
    target.mkdir(parents=True)
    os.rename(builder.cache_dir, target / '0123abcd')


def test_offline_prepare_uses_the_hugging_face_cache_of_an_earlier_run(stories_dir, tmp_path, prepared):
    # the exact user command, `python prepare.py`, with the hub unreachable: served from the cache
    env = offline_env(tmp_path)
    cache_like_an_online_run(stories_dir, tmp_path, tmp_path / 'hf-home')
    sock, port = closed_port()
    with sock:
        env['HF_ENDPOINT'] = f'http://127.0.0.1:{port}'
        t0 = time.time()
        result = run_script('prepare.py', f'--out_dir={tmp_path}/data', env=env)
    assert result.returncode == 0, result.stderr
    assert time.time() - t0 < 30  # straight to the cache, not after datasets' ~50 s of retries
    meta = json.loads((tmp_path / 'data' / 'meta.json').read_text())
    reference = json.loads((prepared[0] / 'meta.json').read_text())
    assert meta['splits'] == reference['splits']  # same tokens, stories, bytes and sha256


def test_hub_probe(monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionRefusedError
    for key in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy'):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    assert prepare.hub_reachable() is False
    monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.example:3128')  # behind a proxy datasets decides
    assert prepare.hub_reachable() is True


def test_missing_tokenizer_files_fail_with_the_tiktoken_cache_hint(tmp_path, stories_dir):
    sock, port = closed_port()
    with sock:  # an empty tiktoken cache and a refused local proxy: the BPE download fails at once
        env = offline_env(tmp_path, TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty-cache'),
                          HTTPS_PROXY=f'http://127.0.0.1:{port}', HTTP_PROXY=f'http://127.0.0.1:{port}')
        result = run_script('prepare.py', *files_args(stories_dir, tmp_path / 'data', 'sample5.txt', 'sample5.txt'),
                            env=env)
    err = one_line_error(result)
    assert 'GPT-2 tokenizer' in err and 'TIKTOKEN_CACHE_DIR' in err
    assert not (tmp_path / 'data').exists()


def test_hub_code_path_on_a_local_dataset_folder(stories_dir, tmp_path, prepared):
    # a datasets-loadable folder (train/validation jsonl, a 'text' column) goes through
    # load_dataset and the batched iteration, offline, and must give the same bins
    folder = tmp_path / 'ts'
    folder.mkdir()
    for split, name in (('train', 'train.txt'), ('validation', 'validation.txt')):
        rows = [json.dumps({'text': f'\n{s}  \n'}) for s in stripped_stories(stories_dir / name)]
        (folder / f'{split}.jsonl').write_text('\n'.join(rows + [json.dumps({'text': '   '})]) + '\n')
    out = tmp_path / 'data'
    result = run_script('prepare.py', f'--dataset={folder}', f'--out_dir={out}', env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / 'meta.json').read_text())
    reference = json.loads((prepared[0] / 'meta.json').read_text())
    assert meta['splits'] == reference['splits']  # same tokens, stories, bytes and sha256
    assert meta['sources'] == {'train': [f'hf:{folder}:train'], 'val': [f'hf:{folder}:validation']}


def _die_in_worker(task):
    os._exit(3)  # like the OOM killer taking a worker


def test_a_dying_worker_stops_the_run_instead_of_hanging(tmp_path):
    out = str(tmp_path / 'data')
    with pytest.raises(SystemExit, match='tokenizer process died'):
        prepare.write_dataset(out, {'train': (_die_in_worker, ['a story'] * 3, None)}, {'train': []}, num_proc=2)
    assert not os.path.exists(out)  # the folder this run made is removed again


def pids_alive(pids):
    """Those of pids still running (a zombie, dead but not yet reaped, does not count)."""
    alive = []
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except OSError:
            continue
        if state != 'Z':
            alive.append(pid)
    return alive


def children_of(pid):
    """The pids whose parent is pid, from /proc/*/stat."""
    kids = []
    for stat in glob.glob('/proc/[0-9]*/stat'):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(stat.split('/')[2]))
    return kids


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='finds the workers in /proc')
def test_workers_exit_when_the_main_process_is_killed(stories_dir, tmp_path):
    big = tmp_path / 'big.txt'
    big.write_bytes((stories_dir / 'train.txt').read_bytes() * 10)  # ~23 MB: many seconds of tokenizing
    args = [f'--train_files={big}', f'--val_files={big}', f'--out_dir={tmp_path}/data', '--num_proc=2']
    main = start_script('prepare.py', *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 60
        while len(workers) < 2 and main.poll() is None and time.time() < deadline:
            time.sleep(0.05)
            workers = children_of(main.pid)  # the start method is fork: the workers are its children
        assert len(workers) == 2 and main.poll() is None, (workers, main.returncode)
        main.kill()  # SIGKILL, like the OOM killer: no cleanup runs in the main process
        main.wait()
        deadline = time.time() + 10
        while pids_alive(workers) and time.time() < deadline:
            time.sleep(0.1)
        assert pids_alive(workers) == [], 'tokenizer workers outlived the killed main process'
    finally:
        main.kill()
        for pid in pids_alive(workers):
            os.kill(pid, signal.SIGKILL)
