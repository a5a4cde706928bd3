"""The label store of a dataset: an append-only log that never loses a label.

``DATASET/labels.jsonl`` holds one JSON object per line, one line per change::

    {"id": "run0001.cxi:17", "label": "ice", "who": "jdoe", "when": "2026-11-25T16:06:49Z",
     "source": "human"}

``label`` may be ``null`` (label removed). The current label of a sample is its last
line. ``source`` is one of ``human``, ``oracle`` (simulated labeler), ``pseudo``
(model's confident guess; never counted as a human label), ``ingest``.
Appends take an exclusive ``flock`` and are fsynced; a crash mid-append leaves at most
one partial last line, which readers ignore and the next writer repairs.
"""
import json
import os

LOG_NAME = "labels.jsonl"
SOURCES = ("human", "oracle", "pseudo", "ingest", "import")


class LabelStore:
    """Labels of one dataset directory (see module docstring for the format)."""

    def __init__(self, dataset_dir):
        self.dataset_dir = os.fspath(dataset_dir)
        self.path = os.path.join(self.dataset_dir, LOG_NAME)

    def history(self):
        """All complete records, oldest first (a partial last line is skipped)."""
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # torn final write: ignored
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    records.append(rec)
        return records

    def current(self, sources=None, exclude_sources=()):
        """``{id: last record}`` per sample, over records of ``sources`` (default all)."""
        out = {}
        for rec in self.history():
            src = rec.get("source")
            if (sources is None or src in sources) and src not in exclude_sources:
                out[rec["id"]] = rec
        return out
