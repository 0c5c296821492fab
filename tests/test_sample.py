"""sample.py end to end on a tiny checkpoint made here, and its one-line errors."""
import io

import pytest

import sample
from conftest import error_of, one_line_error, run_script, tiny_checkpoint
from data import get_tokenizer

SEP = '\n---------------\n'


@pytest.fixture(scope='module')
def ckpt_path(tmp_path_factory):
    """A tiny random GPT over the real GPT-2 vocabulary, saved as a torch.compile'd model
    would be (keys prefixed _orig_mod.), in out_dir/best_model_params.pt."""
    return tiny_checkpoint(tmp_path_factory.mktemp('out') / 'best_model_params.pt', prefix='_orig_mod.',
                           block_size=32, n_layer=2, n_head=2, n_embd=32)


def run_main(capsys, *args):
    sample.main(list(args))
    return capsys.readouterr()


def test_end_to_end_streams_samples_from_out_dir(ckpt_path):
    r = run_script('sample.py', f'--out_dir={ckpt_path.parent}', '--start=A little girl', '--num_samples=2',
                   '--max_new_tokens=12', '--temperature=1.0')
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split(SEP)
    assert len(samples) == 3 and samples[2] == ''
    assert all(s.startswith('A little girl') and len(s) > len('A little girl') for s in samples[:2])
    assert samples[0] != samples[1]
    assert '2 samples' in r.stderr and 'tokens/s' in r.stderr


def test_greedy_output_is_the_same_with_and_without_kv_cache(ckpt_path, capsys):
    args = [f'--ckpt={ckpt_path}', '--start=Once upon a time', '--num_samples=1',
            '--max_new_tokens=60', '--temperature=0']  # 60 new tokens: past block_size 32
    cached = run_main(capsys, *args).out
    assert cached == run_main(capsys, *args, '--kv_cache=False').out
    assert cached.startswith('Once upon a time') and len(cached) > 40


def test_same_seed_same_text_other_seed_other_text(ckpt_path, capsys):
    args = [f'--ckpt={ckpt_path}', '--num_samples=2', '--max_new_tokens=20', '--top_p=0.95']
    first = run_main(capsys, *args, '--seed=3').out
    assert first == run_main(capsys, *args, '--seed=3').out
    assert first != run_main(capsys, *args, '--seed=4').out


def test_prompt_from_a_file_and_too_long_a_prompt_keeps_its_tail(ckpt_path, tmp_path, capsys):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('The cat sat on the mat. ' * 20 + 'The end')
    n = len(get_tokenizer().encode(prompt.read_text()))
    out = run_main(capsys, f'--ckpt={ckpt_path}', f'--start=FILE:{prompt}', '--num_samples=1',
                   '--max_new_tokens=5')
    assert f'warning: the prompt is {n} tokens, longer than' in out.err
    assert 'keeping its last 32 tokens' in out.err
    assert out.out.count('The cat') < 20 and 'The end' in out.out  # the tail is kept


def test_text_is_streamed_whole_characters_at_a_time():
    enc = get_tokenizer()
    text = 'Zoë saw a 🐶 and said “héllo” 日本'
    ids = enc.encode(text)
    assert len(ids) > len(text.split())  # some characters are split over several tokens

    class Recorder(io.StringIO):
        pieces = []

        def write(self, s):
            self.pieces.append(s)
            return super().write(s)

    out = Recorder()
    n = sample.print_story(enc, ids + [enc.eot_token] + enc.encode(' more'), out)
    assert out.getvalue() == text  # stops at <|endoftext|>
    assert n == len(ids) + 1
    assert not any('\ufffd' in p for p in out.pieces)


@pytest.mark.parametrize('args, message', [
    (['--top_p=0'], 'error: --top_p=0.0 must be in (0, 1]'),
    (['--top_p=1.5'], 'error: --top_p=1.5 must be in (0, 1]'),
    (['--temperature=-1'], 'error: --temperature=-1.0 must be in [0, inf)'),
    (['--top_k=-1'], 'error: --top_k=-1 must be in [0, inf)'),
    (['--num_samples=0'], 'error: --num_samples=0 must be in [1, inf)'),
    (['--colour=red'], 'error: unknown option --colour'),
    (['--start=FILE:/no/such/prompt.txt'], "error: cannot read the prompt file '/no/such/prompt.txt'"),
])
def test_bad_options_stop_with_one_line(ckpt_path, args, message):
    assert error_of(sample.main, [f'--ckpt={ckpt_path}', *args]).startswith(message)


def test_missing_checkpoint_says_run_train_first(tmp_path):
    r = run_script('sample.py', f'--out_dir={tmp_path}')
    assert one_line_error(r) == (
        f"error: no checkpoint at {tmp_path}/best_model_params.pt: run `python train.py` first (or pass --ckpt=PATH)")


def test_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / 'best_model_params.pt'
    bad.write_bytes(b'not a checkpoint at all')
    assert error_of(sample.main, [f'--ckpt={bad}']).startswith(f"error: could not read checkpoint {bad} (corrupt")
