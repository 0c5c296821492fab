# The seed recipe for a GPU: a 6-layer, 6-head, 384-wide GPT (30M parameters, 10.6M of them
# outside the embeddings) on all of TinyStories (~470M tokens after `python prepare.py`).
#   python train.py config/tinystories.py                 # one GPU, bf16 (fp16 + GradScaler on older GPUs)
#   torchrun --nproc_per_node=8 train.py config/tinystories.py   # 8 GPUs: same tokens per step
# These equal train.py's defaults (tests/test_configs.py checks it); the file spells them out so
# runs can copy and edit it.
out_dir = 'out'
data_dir = 'data/tinystories'
# model: the seed's shape
n_layer = 6
n_head = 6
n_embd = 384
block_size = 128
dropout = 0.1
bias = True
# 32 sequences x 128 tokens x 8 micro-batches = 32,768 tokens per optimizer step;
# 20,000 steps = 655M tokens, ~1.4 passes over TinyStories
batch_size = 32
gradient_accumulation_steps = 8
max_iters = 20000
# AdamW with warmup + cosine. The seed notebook had learning_rate=1e-4 below min_lr=5e-4 (its
# cosine "decay" raised the LR) and stepped the schedule per micro-batch; here the LR peaks
# at 5e-4 after 1000 optimizer steps and decays to a tenth of it by the last step. The decay
# ends at max_iters (lr_decay_iters is left at train.py's 0), so a shorter run (--max_iters=300,
# or the max_iters that --max_minutes fits) decays over its own length, its warmup cut to a
# tenth of the run where 1000 steps would take more than half of it.
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.5
# evaluate (200 batches of each split) and checkpoint every 500 steps
eval_interval = 500
eval_iters = 200
log_interval = 10
# GPU: bf16 autocast where supported, else fp16 with a GradScaler. --compile=True is faster
# on GPUs (a minute to start); off here so the same command also runs anywhere, CPU included
device = 'auto'
dtype = 'auto'
compile = False
