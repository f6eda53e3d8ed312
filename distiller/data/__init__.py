"""Training data: datasets of labelled structures on disk (`dataset`), and the grain loader (`loader`).

Samplers (`distiller.data.sampling`) make candidate structures; `distiller.label` labels them with a teacher
into a dataset; `distiller.data.loader.Loader` feeds a dataset to offline training.
"""

from distiller.data.dataset import (Dataset, DatasetError, IncompleteDataset, ShardWriter, decode_structure,
                                    encode_structure, is_dataset, merge_datasets, open_dataset, write_dataset)

__all__ = ["Dataset", "DatasetError", "IncompleteDataset", "ShardWriter", "decode_structure", "encode_structure",
           "is_dataset", "merge_datasets", "open_dataset", "write_dataset"]
