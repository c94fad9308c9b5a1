from __future__ import annotations

import numpy as np

from airlora.data import ComplexityFeatures, ComplexityMeter, encode
from airlora.data.loading import TextExamples
from conftest import make_rows


def test_features_separate_easy_from_hard_batches(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    corpus_rows = make_rows(200)
    corpus = encode(tok, TextExamples([t for t, _ in corpus_rows], np.zeros(200)), 32)
    meter = ComplexityMeter(corpus, len(tok), 32, set(tok.all_special_ids))

    easy = ["the team won", "the match was", "a goal in the"] * 3
    # Long texts of rare, out-of-vocabulary words that split into many pieces.
    hard = [
        "quixotic zygomorphic bureaucratization of photosynthesizing xylophonists juxtaposed",
        "labyrinthine cryptocurrency hyperinflation destabilizes quantitative macroeconomics",
        "phenomenological hermeneutics vexes jurisprudential epistemologists quickly",
    ] * 3
    split = encode(tok, TextExamples(easy + hard, np.zeros(len(easy) + len(hard))), 32)
    e = meter.measure(split, np.arange(len(easy)))
    h = meter.measure(split, np.arange(len(easy), len(easy) + len(hard)))
    assert h.length > 2 * e.length
    assert h.rarity > e.rarity + 0.1
    assert h.tokens_per_word > 2 * e.tokens_per_word
    assert h.type_token_ratio != e.type_token_ratio
    assert ComplexityFeatures.names()[:4] == [
        "length",
        "type_token_ratio",
        "rarity",
        "tokens_per_word",
    ]
    assert e.as_array().shape == (5,)
