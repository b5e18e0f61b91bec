"""Dataset sources -> one in-memory form -> a Parquet manifest (see ``manifest.py``)."""

from dedt.data.sources import SOURCES, RawDataset, load_source

__all__ = ["SOURCES", "RawDataset", "load_source"]
