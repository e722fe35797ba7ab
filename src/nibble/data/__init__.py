"""Datasets: reading rows, label maps, tokenization, batching."""

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

__all__ = [
    "BatchStream",
    "ClassificationData",
    "LabelMap",
    "Row",
    "class_weights",
    "collate",
    "iter_batches",
    "load_classification",
    "read_rows",
    "stratified_split",
]
