"""Moved to `imatrix.ggufio.reader`; kept until the adapters written against it are updated."""

from imatrix.ggufio.reader import GGUFModelFile, MappedPages, MetadataField, TensorInfo  # noqa: F401
