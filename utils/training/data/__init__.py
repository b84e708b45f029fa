"""The data seam: what the user passed turned into batches. Other seams use only the names below (``BatchSource``
is the contract).

Where each job lives: which source serves what the user passed (sources), one row -> one ``Example`` and the checks
on rows and batches (rows), which rows a part holds: the hold-out, each process's shard, rows gone past (subsets);
the sources: examples in memory or on disk (tables), a user's DataLoader (loaders), streams (streaming); the
contract and the read log (source_contract), the plans (batch_plans), the padding (collate).
"""
from .batch_plans import MEGA_BATCH_FACTOR, PlanSettings
from .collate import PaddingCollator, to_device
from .data_settings import DataSettings
from .loaders import LoaderBatches
from .rows import Example, check_pad_token_id
from .source_contract import BatchSource
from .sources import (SourceOptions, batch_source, run_length, source_options, synthetic_sequences,
                      train_and_val_sources)
from .streaming import StreamBatches
from .subsets import shard_batches
from .tables import ExampleBatches, to_examples

__all__ = ["BatchSource", "DataSettings", "Example", "ExampleBatches", "LoaderBatches", "MEGA_BATCH_FACTOR",
           "PaddingCollator", "PlanSettings", "SourceOptions", "StreamBatches", "batch_source", "check_pad_token_id",
           "run_length", "shard_batches", "source_options", "synthetic_sequences", "to_device", "to_examples",
           "train_and_val_sources"]
