"""Build the C kernels (kernels/*.c) into ``lcls_dl._kernels``.

The extension is optional: where no C compiler is available the install still
succeeds and lcls_dl falls back to the numpy reference implementations, with a
single warning at first use.
"""
from glob import glob

from setuptools import Extension, setup

kernels = Extension(
    "lcls_dl._kernels",
    sources=sorted(glob("kernels/*.c")),
    include_dirs=["kernels"],
    extra_compile_args=["-O3", "-std=c99", "-fno-strict-aliasing"],
    optional=True,
)

setup(ext_modules=[kernels])
