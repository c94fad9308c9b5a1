"""Linguistic complexity of a round's training batches (design section 1, step 2).

Cheap features that vary between batches and that a policy can condition on:

- ``length``: mean tokens per text, divided by ``max_length`` (0..1].
- ``type_token_ratio``: distinct token ids over all tokens in the batch (lexical diversity).
- ``rarity``: mean surprisal of the batch's tokens under the training corpus's unigram
  distribution, divided by log(vocabulary size) (rare vocabulary scores high).
- ``tokens_per_word``: sub-word fertility; long or unusual words split into many pieces.
- ``model_loss``: the current server model's cross-entropy on the batch before the round's
  training (how hard the batch is for the model itself). Optional: it costs one forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from airlora.data.batching import EncodedSplit


@dataclass(frozen=True)
class ComplexityFeatures:
    """A small named feature vector; ``as_array`` keeps the field order."""

    length: float
    type_token_ratio: float
    rarity: float
    tokens_per_word: float
    model_loss: float = float("nan")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_array(self) -> np.ndarray:
        return np.asarray([getattr(self, n) for n in self.names()], dtype=np.float32)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @staticmethod
    def mean(items: list[ComplexityFeatures]) -> ComplexityFeatures:
        arr = np.stack([c.as_array() for c in items]).mean(axis=0)
        return ComplexityFeatures(*(float(x) for x in arr))


class ComplexityMeter:
    """Computes :class:`ComplexityFeatures` for index batches of one encoded split.

    Parameters
    ----------
    corpus:
        The server's training split; its unigram counts define ``rarity``.
    vocab_size:
        Tokenizer vocabulary size (add-one smoothing and normalisation).
    max_length:
        Truncation length, to normalise ``length``.
    special_ids:
        Token ids of special tokens ([CLS], [SEP], padding), left out of every feature.
    """

    def __init__(
        self, corpus: EncodedSplit, vocab_size: int, max_length: int, special_ids: set[int]
    ):
        all_ids = np.concatenate(corpus.input_ids) if len(corpus) else np.zeros(0, np.int64)
        counts = np.bincount(all_ids, minlength=vocab_size).astype(np.float64) + 1.0
        self._surprisal = -np.log(counts / counts.sum())
        self._unseen = float(-np.log(1.0 / counts.sum()))
        self._log_vocab = float(np.log(vocab_size))
        self._special = np.fromiter(special_ids, dtype=np.int64) if special_ids else None
        self.max_length = max_length

    def _content(self, ids: np.ndarray) -> np.ndarray:
        if self._special is None:
            return ids
        return ids[~np.isin(ids, self._special)]

    def _token_surprisal(self, tokens: np.ndarray) -> np.ndarray:
        known = tokens < self._surprisal.size  # ids added to a tokenizer after the corpus
        out = np.full(tokens.shape, self._unseen)
        out[known] = self._surprisal[tokens[known]]
        return out

    def measure(
        self, split: EncodedSplit, index: np.ndarray, model_loss: float = float("nan")
    ) -> ComplexityFeatures:
        seqs = [self._content(split.input_ids[i]) for i in index]
        tokens = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        if tokens.size == 0:
            return ComplexityFeatures(0.0, 0.0, 0.0, 0.0, model_loss)
        return ComplexityFeatures(
            length=float(np.mean([len(s) for s in seqs]) / self.max_length),
            type_token_ratio=float(np.unique(tokens).size / tokens.size),
            rarity=float(self._token_surprisal(tokens).mean() / self._log_vocab),
            tokens_per_word=float(tokens.size / split.word_counts[index].sum()),
            model_loss=float(model_loss),
        )
