"""Data: record formats, the KD dataset, quality reports, tokenizer training."""

from kdforge.data.records import Record, parse_record, read_records

__all__ = ["Record", "parse_record", "read_records", "KDDataset"]


def __getattr__(name):  # KDDataset pulls in torch; keep `kdforge.data.records` light
    if name == "KDDataset":
        from kdforge.data.dataset import KDDataset
        return KDDataset
    raise AttributeError(name)
