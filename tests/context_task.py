"""A synthetic classification task that needs global context.

Each example is [CLS] followed by 511 tokens; label 1 iff the marker token appears both in the
first 64 and in the last 64 tokens. The marker never appears in between, so a model whose local
layers see 64 tokens each side cannot relate the two ends without a global layer: the two regions
are 384 tokens apart, and even four local layers reach 256.
"""

import random

PAD, CLS, MARKER = 0, 1, 2
FIRST_CONTENT_TOKEN, VOCAB_SIZE = 3, 32
SEQ_LEN, REGION = 512, 64


def make_example(rng: random.Random, seq_len: int = SEQ_LEN, region: int = REGION) -> dict:
    tokens = [rng.randrange(FIRST_CONTENT_TOKEN, VOCAB_SIZE) for _ in range(seq_len - 1)]
    # Half the examples are positive; the negatives split evenly between none, first only, last only.
    case = "both" if rng.random() < 0.5 else rng.choice(["none", "first", "last"])
    if case in ("both", "first"):
        for _ in range(rng.randint(1, 3)):
            tokens[rng.randrange(0, region)] = MARKER
    if case in ("both", "last"):
        for _ in range(rng.randint(1, 3)):
            tokens[rng.randrange(len(tokens) - region, len(tokens))] = MARKER
    return {"input_ids": [CLS] + tokens, "label": int(case == "both")}


def make_dataset(count: int, seed: int, **kwargs) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, **kwargs) for _ in range(count)]


def tiny_config(**overrides):
    """A small encoder for the task: local layers (window 64 each side) then global ones."""
    from modernbert import ModernBertConfig

    values = dict(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        local_attention=128, layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=PAD,
        cls_token_id=CLS, classifier_pooling="cls", id2label={0: "no", 1: "yes"},
        max_position_embeddings=SEQ_LEN,
    )
    values.update(overrides)
    return ModernBertConfig(**values)
