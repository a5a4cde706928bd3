"""lcls-dl: scientific image classification for X-ray light sources.

Stages, each usable as a library and from the ``lcls-dl`` command line:
simulate -> ingest -> train (optionally over MPI) -> evaluate / predict -> suggest-labels.
"""
__version__ = "0.1.0"
