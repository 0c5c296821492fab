# Train on 2 CPU cores in about 15 minutes, on the small real sample in ../shared:
#   python prepare.py --train_files=../shared/data/tinystories/train.txt --val_files=../shared/data/tinystories/validation.txt
#   python train.py config/tinystories_cpu.py
#
# Why this size. The data is 2,800 stories = 559k training tokens. On this 2-core machine the
# seed model (6/6/384, 183 MFLOP per token) trains at ~800 tokens/s in fp32 (measured,
# quiet machine), so 15 minutes would be ~720k tokens: 1.3 passes over the data for a model
# whose 50,257 x 384 output layer alone is 19M parameters. A 4-layer, 256-wide model costs
# 98 MFLOP per token (model.flops_per_token()), i.e. ~1.9x the tokens in the same time: about
# 2 passes over the sample, which a small, dropout-regularised model can use without
# overfitting. Sized from these measured rates; the learning rate was not swept (the session
# that wrote this had no quiet CPU for 15-minute sweeps), so a better setting may exist.
out_dir = 'out'
data_dir = 'data/tinystories'
n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
dropout = 0.1
batch_size = 16                  # 16 x 128 = 2,048 tokens per step, ~1.5 s per step here
gradient_accumulation_steps = 1
max_iters = 600                  # ~1.2M tokens: ~2 passes over the 559k-token sample
learning_rate = 1e-3             # small models tolerate a higher peak LR
min_lr = 1e-4
warmup_iters = 50
lr_decay_iters = 600
eval_interval = 100
eval_iters = 10
log_interval = 10
device = 'cpu'
dtype = 'float32'
compile = False
