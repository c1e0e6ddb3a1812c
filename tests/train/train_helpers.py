"""What the training tests share: the architecture of their tiny models (a few seconds a run on one thread)."""

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vision_depth": 1,
    "vision_embed_dim": 64,
    "max_cot_tokens": 8,
}
