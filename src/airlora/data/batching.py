"""Tokenise once, then serve length-bucketed, dynamically padded batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from airlora.data.loading import TextExamples


@dataclass(frozen=True)
class EncodedSplit:
    """Token ids of one split, unpadded (one array per example)."""

    input_ids: list[np.ndarray]
    labels: np.ndarray
    word_counts: np.ndarray  # whitespace words per text, for the tokens-per-word feature

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))


def encode(tokenizer, examples: TextExamples, max_length: int) -> EncodedSplit:
    """Tokenise with truncation and no padding; padding happens per batch."""
    out = tokenizer(examples.texts, truncation=True, max_length=max_length, padding=False)
    ids = [np.asarray(x, dtype=np.int64) for x in out["input_ids"]]
    words = np.fromiter((max(len(t.split()), 1) for t in examples.texts), dtype=np.int64)
    return EncodedSplit(ids, examples.labels.astype(np.int64), words)


def collate(split: EncodedSplit, index: np.ndarray, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest among them (dynamic padding)."""
    seqs = [split.input_ids[i] for i in index]
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_token_id, dtype=np.int64)
    attention = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = s
        attention[row, : len(s)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(split.labels[index]),
    }


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 50
) -> list[np.ndarray]:
    """One epoch of index batches: shuffle, sort by length inside chunks, shuffle the batches.

    Chunks of ``bucket_batches * batch_size`` examples keep the batches random across the
    epoch while examples of similar length share a batch, so padding is small.
    """
    order = rng.permutation(len(lengths))
    chunk = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class TrainStream:
    """Endless seeded stream of training batches, epoch after epoch."""

    def __init__(self, split: EncodedSplit, batch_size: int, seed: int, pad_token_id: int):
        self.split = split
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self._rng = np.random.default_rng(seed)
        self._lengths = split.lengths
        self._queue: list[np.ndarray] = []
        self.epoch = 0

    def next_index(self) -> np.ndarray:
        if not self._queue:
            self._queue = bucketed_batches(self._lengths, self.batch_size, self._rng)
            self.epoch += 1
        return self._queue.pop()

    def take(self, n_batches: int) -> list[np.ndarray]:
        return [self.next_index() for _ in range(n_batches)]

    def state_dict(self) -> dict:
        """Where the stream is (its RNG, the epoch's remaining batches), as plain numbers."""
        return {
            "rng": self._rng.bit_generator.state,
            "queue": [q.tolist() for q in self._queue],
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s position."""
        self._rng.bit_generator.state = state["rng"]
        self._queue = [np.asarray(q, dtype=np.int64) for q in state["queue"]]
        self.epoch = state["epoch"]


def eval_batches(split: EncodedSplit, batch_size: int) -> Iterator[np.ndarray]:
    """Batches sorted by length: evaluation order does not matter, padding does."""
    order = np.argsort(split.lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]
