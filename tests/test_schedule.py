"""schedule.py: the LR schedule (cosine or warmup-stable-decay) and the warmup of a short run
(the --max_minutes fit is run end to end in test_train.py)."""
import pytest

from schedule import cut_warmup, get_lr

COSINE = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=1100, max_iters=2000,
              decay_lr=True, lr_schedule='cosine', decay_fraction=0.2)


def test_cosine_warms_up_then_decays_to_min_lr():
    cfg = COSINE
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 101)          # warmup starts small, not at 0
    assert get_lr(100, cfg) == pytest.approx(1e-3)              # warmup end: the peak
    assert get_lr(600, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert get_lr(1100, cfg) == pytest.approx(1e-4)             # decay end: min_lr ...
    assert get_lr(1999, cfg) == pytest.approx(1e-4)             # ... and flat after
    lrs = [get_lr(it, cfg) for it in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))            # never rises after warmup
    assert get_lr(1100, {**cfg, 'lr_decay_iters': 0}) > 1e-4    # 0: decay over max_iters
    assert get_lr(2000, {**cfg, 'lr_decay_iters': 0}) == pytest.approx(1e-4)
    assert get_lr(5, {**cfg, 'decay_lr': False}) == 1e-3


def test_wsd_holds_the_peak_then_decays_in_a_straight_line():
    """Warmup-stable-decay over 1,000 steps with decay_fraction 0.2: the peak from the end of the
    warmup to step 800, then a straight line to min_lr at step 1,000, then flat."""
    cfg = {**COSINE, 'lr_schedule': 'wsd', 'lr_decay_iters': 0, 'max_iters': 1000}
    assert get_lr(0, cfg) == get_lr(0, COSINE)                  # the same warmup
    assert all(get_lr(it, cfg) == 1e-3 for it in range(100, 801))
    assert get_lr(900, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the line
    assert get_lr(999, cfg) == pytest.approx(1e-4 + 9e-4 / 200)
    assert get_lr(1000, cfg) == get_lr(5000, cfg) == 1e-4
    steps = [get_lr(it, cfg) for it in range(800, 1001)]
    assert all(a - b == pytest.approx(9e-4 / 200) for a, b in zip(steps, steps[1:]))
    short = {**cfg, 'decay_fraction': 1.0}                       # all of it decays: straight from the peak
    assert get_lr(100, short) == 1e-3 and get_lr(550, short) == pytest.approx((1e-3 + 1e-4) / 2)


def test_a_run_its_warmup_would_take_more_than_half_of_warms_up_for_a_tenth():
    """A quick --max_iters=50 under a 1000-step warmup, or a --max_minutes budget that fits 1,019
    steps: a tenth of the run warms up, the rest decays. Half the run or less is left alone."""
    cfg = {**COSINE, 'lr_decay_iters': 0, 'max_iters': 50, 'warmup_iters': 1000}
    assert 'warming up for 5 steps instead' in cut_warmup(cfg) and cfg['warmup_iters'] == 5
    assert cut_warmup(cfg) is None  # now it fits
    fitted = {**cfg, 'max_iters': 1019, 'warmup_iters': 1000}
    assert 'more than half the LR decay (1019 steps): warming up for 101 steps' in cut_warmup(fitted)
    assert cut_warmup({**cfg, 'max_iters': 2000, 'warmup_iters': 1000}) is None
    assert cut_warmup({**cfg, 'max_iters': 50, 'warmup_iters': 1000, 'decay_lr': False}) is None
