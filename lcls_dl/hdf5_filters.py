"""hdf5plugin's compression filters, registered with the HDF5 library that h5py uses.

Call :func:`register_filters` before reading or writing data compressed with Blosc,
bitshuffle/LZ4, zstd... (NXmx detector files, the images of lcls-dl's shards).
"""
_REGISTERED = []


def register_filters():
    """Register hdf5plugin's filters once per process, over any other copy of them.

    ``import hdf5plugin`` alone skips a filter that HDF5 already finds, and HDF5 looks
    along ``HDF5_PLUGIN_PATH`` for it: the netCDF4 wheel sets that variable to its own
    plugins, built against another copy of libhdf5, and h5py then fails with "error
    during user callback" on every Blosc dataset. Forcing the registration replaces them.
    """
    if not _REGISTERED:
        import hdf5plugin

        hdf5plugin.register(force=True)
        _REGISTERED.append(True)
