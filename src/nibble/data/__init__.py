"""Datasets: reading rows, label maps, chat rendering with response masks, tokenization, batching."""

from nibble.data.classify import (
    BatchStream,
    ClassificationData,
    LabelMap,
    Row,
    class_weights,
    collate,
    iter_batches,
    load_classification,
    read_rows,
    stratified_split,
)
from nibble.data.instruct import InstructData, load_instruct

__all__ = [
    "BatchStream",
    "ClassificationData",
    "InstructData",
    "LabelMap",
    "Row",
    "class_weights",
    "collate",
    "iter_batches",
    "load_classification",
    "load_instruct",
    "read_rows",
    "stratified_split",
]
