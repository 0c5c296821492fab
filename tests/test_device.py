"""device.py: the device and the precision a script runs with."""
import torch

import device
from conftest import error_of


def test_device_and_dtype_choice():
    # auto: what torch reports here (CI has no GPU; a user's machine may)
    mps = getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()
    assert device.pick_device('auto') == ('cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu')
    assert device.pick_device('cpu') == 'cpu'
    if not torch.cuda.is_available():
        assert 'not usable here' in error_of(device.pick_device, 'cuda')
    assert '--device=cpu' in error_of(device.pick_device, 'nonsense')
    assert device.pick_dtype('auto', 'cpu') == 'float32'
    assert device.pick_dtype('bfloat16', 'cpu') == 'bfloat16'
    assert 'not one of' in error_of(device.pick_dtype, 'fp8', 'cpu')
