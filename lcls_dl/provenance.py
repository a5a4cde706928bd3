"""Software versions and run parameters recorded in every output (manifest, model.json)."""
import datetime
import platform
import sys

from . import __version__


def software_versions():
    """Return a dict of the versions that determine lcls-dl's numbers.

    Imports nothing heavy: TensorFlow's version is read from package metadata. In a
    process that runs MPI (mpi4py.MPI already imported), ``mpi_library`` names the MPI
    library the ranks used (first line of ``MPI.Get_library_version()``).
    """
    from importlib import metadata

    versions = {"lcls_dl": __version__, "python": sys.version.split()[0],
                "platform": platform.platform()}
    for dist in ("numpy", "h5py", "hdf5plugin", "tensorflow", "keras", "mpi4py",
                 "scikit-image", "scipy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:  # never initialize MPI just to report it
        # Open MPI pads the string with a NUL
        versions["mpi_library"] = mpi.Get_library_version().replace("\x00", "").splitlines()[0].strip()
    return versions


def utc_now():
    """ISO-8601 UTC timestamp with seconds, e.g. ``2026-11-25T16:06:49Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
