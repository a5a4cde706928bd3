"""Distributed execution over MPI: launcher, gradient averaging, data partitioning."""
