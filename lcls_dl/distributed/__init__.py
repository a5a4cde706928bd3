"""Distributed execution over MPI: launcher, gradient averaging, data partitioning.

Public API for your own Keras 3 script (see :mod:`lcls_dl.distributed.keras_api`
and docs/distributed.md)::

    import lcls_dl.distributed as ld
    ld.init()
    opt = ld.DistributedOptimizer(keras.optimizers.Adam(ld.scale_lr(1e-3)))
    model.fit(..., callbacks=[ld.BroadcastCallback(), ld.MetricAverageCallback()])

Launch with ``lcls-dl run --np N script.py``. Importing this package is cheap: MPI
starts in :func:`init`, Keras is imported when a callback class is first used.
"""
_KERAS_API = ("init", "world", "rank", "size", "is_root", "scale_lr", "allreduce",
              "broadcast_object", "barrier", "shard", "DistributedOptimizer",
              "BroadcastCallback", "MetricAverageCallback", "LearningRateWarmupCallback")

__all__ = list(_KERAS_API) + ["LocalWorld", "MPIWorld", "GradientAverager",
                              "get_world", "in_mpi_job"]


def __getattr__(name):
    import importlib

    if name in _KERAS_API:
        return getattr(importlib.import_module(".keras_api", __name__), name)
    where = {"LocalWorld": ".local_world", "MPIWorld": ".mpi_world",
             "get_world": ".mpi_world", "GradientAverager": ".gradient_averager", "in_mpi_job": ".launcher"}
    if name in where:
        return getattr(importlib.import_module(where[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
