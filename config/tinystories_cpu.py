# Train on 2 CPU cores in about 15 minutes (17.5 in the measured run), on the small real sample in ../shared:
#   python prepare.py --train_files=../shared/data/tinystories/train.txt --val_files=../shared/data/tinystories/validation.txt
#   python train.py config/tinystories_cpu.py
#
# Why this size. The data is 2,800 stories = 559k training tokens. On this 2-core machine the
# seed model (6/6/384, 183 MFLOP per token) trains at 670-810 tokens/s in fp32 (bench.py,
# depending on the neighbours), so 15 minutes would be ~650k tokens: barely more than one pass
# for a model whose 50,257 x 384 output layer alone is 19M parameters. A 4-layer, 256-wide model
# costs 98 MFLOP per token (model.flops_per_token()) and runs at ~1,170 tokens/s (1.75 s per
# 16 x 128 step, measured): 500 steps = 1.0M tokens, ~1.8 passes over the sample, in ~15 min
# (the measured run: 17.5 min, as the shared machine slowed to ~2 s per step; val loss 3.36).
# Learning rate, measured on this config (600 steps, 2 runs side by side): 2e-3 led 1e-3 at every
# evaluation (val 4.27 vs 4.35 at step 100; batch loss 3.93 vs 4.02 at step 170, when 1e-3 was
# stopped) and reached val 3.26 at step 600. Higher rates were not tried.
out_dir = 'out'
data_dir = 'data/tinystories'
n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
dropout = 0.1
batch_size = 16                  # 16 x 128 = 2,048 tokens per step, ~1.75 s per step here
gradient_accumulation_steps = 1
max_iters = 500                  # ~1.0M tokens: ~1.8 passes over the 559k-token sample
learning_rate = 2e-3             # small models tolerate a higher peak LR (see above)
min_lr = 2e-4
warmup_iters = 50
lr_decay_iters = 500
eval_interval = 100
eval_iters = 10
log_interval = 10
device = 'cpu'
dtype = 'float32'
compile = False
