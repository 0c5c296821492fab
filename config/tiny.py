# A tiny model and short run for tests and smoke checks: seconds on a CPU. It shrinks sizes
# only; it switches off nothing a default run does (tests/conftest.py), and it sets no schedule
# key: the LR schedule is train.py's (its 1000-step warmup cut to a tenth of a short run, the
# cosine ending at max_iters), so the tests run the schedule users get.
#   python train.py config/tiny.py --data_dir=...
out_dir = 'out-tiny'
eval_interval = 4
eval_iters = 2
log_interval = 1
max_iters = 8
batch_size = 8
block_size = 32
gradient_accumulation_steps = 2
n_layer = 2
n_head = 2
n_embd = 32
dropout = 0.1
device = 'cpu'
dtype = 'float32'
