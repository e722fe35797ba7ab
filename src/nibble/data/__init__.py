"""Datasets: records from files, classification labels, chat rendering with response masks, batching."""

from nibble.data.batching import BatchStream, Dataset, iter_batches, pad_batch
from nibble.data.classify import (
    ClassificationData,
    Row,
    class_weights,
    collate,
    load_classification,
    read_rows,
)
from nibble.data.instruct import InstructData, load_instruct
from nibble.data.records import read_records, stratified_split
from nibble.io.runinfo import LabelMap

__all__ = [
    "BatchStream",
    "ClassificationData",
    "Dataset",
    "InstructData",
    "LabelMap",
    "Row",
    "class_weights",
    "collate",
    "iter_batches",
    "load_classification",
    "load_instruct",
    "pad_batch",
    "read_records",
    "read_rows",
    "stratified_split",
]
