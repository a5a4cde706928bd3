/* Minimal CPython module so that setuptools can build lcls_dl._kernels as a
 * regular extension. The kernels themselves are plain C functions
 * (lcls_kernels.h) that lcls_dl/ingest/kernels.py calls through ctypes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "lcls_kernels.h"

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "lcls-dl C kernels (called through ctypes, see lcls_dl.ingest.kernels).",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void)
{
    PyObject *m = PyModule_Create(&kernels_module);
    if (m != NULL) PyModule_AddIntConstant(m, "ABI", LCLS_KERNELS_ABI);
    return m;
}
