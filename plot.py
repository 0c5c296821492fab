"""
Draw a training run's loss curves: train and val loss against tokens seen, with the
learning rate on a second axis, from out_dir/log.jsonl (written by train.py at every
evaluation) to out_dir/loss_curve.png. train.py draws it (runlog.plot_log) when it
finishes; run this to look at a run in progress:

    python plot.py --out_dir=out
"""
import os

from common import check_writable, config_defaults, die, parse_config
from runlog import plot_log

out_dir = 'out'  # the run folder: reads log.jsonl, writes loss_curve.png


def check_config(cfg):
    """A place the PNG cannot be written stops here, with one line, before any drawing."""
    check_writable(cfg['out_dir'], '--out_dir')
    png = os.path.join(cfg['out_dir'], 'loss_curve.png')
    if os.path.isdir(png):
        die(f"{png} is a folder, so the plot cannot be written there: move it away or pick another --out_dir")


def main(argv=None):
    cfg = parse_config(config_defaults(globals()), argv, script=__file__)
    check_config(cfg)
    print(f"wrote {plot_log(cfg['out_dir'])}")


if __name__ == '__main__':
    main()
