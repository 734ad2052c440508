"""Data pipeline: documents -> tokens -> packed, document-masked training rows.

Modules: `sources` (load documents), `tokenizer` (train/load the run's tokenizer: byte-level BPE,
or another kind of `tokenizer_kinds`), `packing` (split documents, build the token stream, cut
rows into batches), `cache` (atomic on-disk cache), `pipeline` (`DataPipeline`, which ties them
together). Import those modules directly; this package only
re-exports the error type so that importing it stays cheap (no `datasets` import).
"""

from jaxformer.data.errors import DataError

__all__ = ["DataError"]
