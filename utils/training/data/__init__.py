"""The data seam: what the user passed turned into batches (sources, tables, streams, loaders), the checks on
the data, the collation and the batch plans. Other seams use only the names below (``BatchSource`` is the contract)."""
from .batch_plans import MEGA_BATCH_FACTOR, PlanSettings, shard_batches
from .collate import PaddingCollator, to_device
from .data_settings import DataSettings
from .example_checks import check_pad_token_id
from .examples import Example, synthetic_sequences, to_examples
from .loaders import LoaderBatches
from .source_contract import BatchSource
from .sources import SourceOptions, batch_source, run_length, source_options, train_and_val_sources
from .streaming import StreamBatches
from .table_batches import ExampleBatches

__all__ = ["BatchSource", "DataSettings", "Example", "ExampleBatches", "LoaderBatches", "MEGA_BATCH_FACTOR",
           "PaddingCollator", "PlanSettings", "SourceOptions", "StreamBatches", "batch_source", "check_pad_token_id",
           "run_length", "shard_batches", "source_options", "synthetic_sequences", "to_device", "to_examples",
           "train_and_val_sources"]
