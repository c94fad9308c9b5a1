"""Data: loading, splits, batching and linguistic complexity."""

from airlora.data.batching import EncodedSplit, TrainStream, collate, encode, eval_batches
from airlora.data.complexity import ComplexityFeatures, ComplexityMeter
from airlora.data.loading import DataError, TaskData, TextExamples, load_task, read_file

__all__ = [
    "ComplexityFeatures",
    "ComplexityMeter",
    "DataError",
    "EncodedSplit",
    "TaskData",
    "TextExamples",
    "TrainStream",
    "collate",
    "encode",
    "eval_batches",
    "load_task",
    "read_file",
]
