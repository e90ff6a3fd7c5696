"""Data: one reader per benchmark, a synthetic generator, feature sources, batching with masks."""

from amess.data import mintrec  # noqa: F401  (registers the reader)
from amess.data import custom, mintrec2  # noqa: F401  (register the readers)
from amess.data.base import DATASETS, DataError, DatasetReader, IntentDataset, SplitData, fingerprint, get_reader

__all__ = ["DATASETS", "DataError", "DatasetReader", "IntentDataset", "SplitData", "fingerprint", "get_reader"]
