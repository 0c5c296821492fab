# Fine-tune a trained model on stories, in the spirit of nanoGPT's finetune_shakespeare: start from
# GPT-2's weights (or any checkpoint), a small LR with a short warmup and decay, a few hundred steps,
# frequent evaluations, and only the best checkpoint kept.
#   python train.py config/finetune_tinystories.py     # GPT-2 (124M, downloaded once) on data/tinystories
# A model of your own on your own stories (each followed by a line <|endoftext|>):
#   python prepare.py --train_files=my_stories.txt --val_files=my_val.txt --out_dir=data/my_stories
#   python train.py config/finetune_tinystories.py --init_from=out/best_model_params.pt --data_dir=data/my_stories
# The model's shape comes from the checkpoint: only dropout and a smaller block_size may be set.
out_dir = 'out-finetune'
data_dir = 'data/tinystories'
init_from = 'gpt2'               # or gpt2-medium/-large/-xl, a checkpoint file, a Hugging Face GPT-2 folder
block_size = 128                 # GPT-2 has 1024 positions: keep the first 128 (a story's length)
dropout = 0.1                    # a few hundred steps on a small text overfit quickly without it
# 16 sequences x 128 tokens x 2 micro-batches = 4,096 tokens per step, 1.2M in 300 steps
batch_size = 16
gradient_accumulation_steps = 2
max_iters = 300
# a tenth of a from-scratch LR: move the weights, don't wipe them; warm up, then decay to a tenth
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 20
# evaluate often, keep ckpt.pt only when the val loss improves
eval_interval = 25
eval_iters = 20
log_interval = 5
always_save_checkpoint = False
