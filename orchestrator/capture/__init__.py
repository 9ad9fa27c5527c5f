"""Payload capture: a sample of what graphs and model steps were sent and answered, kept for
checking, labelling, retraining and drift.

- ``record``: one captured request or step call (``Capture``) and which of its tensors are kept,
  as the spec's ``capture:`` says (rate, inputs, outputs, tensors, max_bytes).
- ``writer``: ``CaptureWriter``, the bounded queue between the request path and the store, drained
  in batches by one background thread. A full queue drops the record and counts it: a request is
  never slowed or failed by capture.

Records go into the ``captures`` table of the store the batch jobs use (jobs/store.py: SQLite by
default, PostgreSQL for replicas); ``onnxmesh capture export`` writes a window of them to Parquet.
"""

from orchestrator.capture.record import Capture, captured_tensors, make_record
from orchestrator.capture.writer import (
    CAPTURE_DB_ENV,
    CAPTURE_MAX_AGE_ENV,
    CAPTURE_MAX_RECORDS_ENV,
    CAPTURE_QUEUE_ENV,
    CaptureWriter,
    StoreSink,
)

__all__ = [
    "CAPTURE_DB_ENV",
    "CAPTURE_MAX_AGE_ENV",
    "CAPTURE_MAX_RECORDS_ENV",
    "CAPTURE_QUEUE_ENV",
    "Capture",
    "CaptureWriter",
    "StoreSink",
    "captured_tensors",
    "make_record",
]
