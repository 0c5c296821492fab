"""model.py: the GPT's parameter count and what its constructor prints."""
from model import GPT, GPTConfig

TINY = dict(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def test_parameter_count_of_the_defaults(capsys):
    model = GPT(GPTConfig())
    assert model.get_num_params(non_embedding=False) == 29_995_392
    assert model.get_num_params() == 29_995_392 - 50257 * 384 - 128 * 384
    assert "30.00M total, 10.65M non-embedding" in capsys.readouterr().out
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_constructor_prints_total_and_non_embedding_counts(capsys):
    GPT(GPTConfig(**TINY))
    out = capsys.readouterr().out
    assert "number of parameters" in out and "total" in out and "non-embedding" in out
