"""checkpoints.py: checked loading of a checkpoint file, whatever wrapped the model that saved it."""
import pytest
import torch

import checkpoints
import common
from conftest import error_of, tiny_checkpoint
from model import GPT, GPTConfig


@pytest.mark.parametrize('prefix', ['', '_orig_mod.', 'module.', 'module._orig_mod.'])
def test_load_model_accepts_compiled_and_ddp_state_dicts(tmp_path, prefix):
    path = tiny_checkpoint(tmp_path / 'ckpt.pt', prefix=prefix)
    saved = torch.load(path, weights_only=True)
    model = GPT(GPTConfig(**saved['model_args']), verbose=False).eval()
    model.load_state_dict({k.removeprefix(prefix): v for k, v in saved['model'].items()})
    loaded, ckpt = checkpoints.load_model(str(path))
    assert set(checkpoints.clean_state_dict(ckpt['model'])) == set(model.state_dict())
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    idx = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    assert 'run `python train.py` first' in error_of(checkpoints.read_checkpoint, str(tmp_path / 'none.pt'))
    good = tiny_checkpoint(tmp_path / 'good.pt')
    data = good.read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 2])
    assert 'corrupt, truncated' in error_of(checkpoints.read_checkpoint, str(tmp_path / 'cut.pt'))
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    assert 'not an SLM checkpoint' in error_of(checkpoints.read_checkpoint, str(tmp_path / 'other.pt'))
    ckpt = torch.load(good, weights_only=True)
    ckpt['model_args']['n_embd'] = 2 * ckpt['model_args']['n_embd']
    common.torch_save(ckpt, tmp_path / 'mismatch.pt')
    assert 'does not match' in error_of(checkpoints.load_model, str(tmp_path / 'mismatch.pt'))
