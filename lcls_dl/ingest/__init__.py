"""Ingest: detector files -> preprocessed, sharded, labeled dataset."""
