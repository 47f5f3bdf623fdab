// The Python module mlra_kernels._C, on Python's limited C API (Py_LIMITED_API: one binary for every CPython
// the wheel's abi3 tag admits). Loading it registers the mlra:: ops (static initialisers of the op sources
// linked into it, on LibTorch's stable ABI); the module itself is empty. How it was built is recorded in
// mlra_kernels/_build_info.json, written by setup.py next to it.
#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

#define MLRA_CONCAT_(a, b) a##b
#define MLRA_CONCAT(a, b) MLRA_CONCAT_(a, b)
#define MLRA_STRINGIFY_(a) #a
#define MLRA_STRINGIFY(a) MLRA_STRINGIFY_(a)

static PyModuleDef mlra_module = {
    PyModuleDef_HEAD_INIT,
    MLRA_STRINGIFY(TORCH_EXTENSION_NAME),
    "mlra-kernels compiled ops, registered under torch.ops.mlra when this module loads",
    -1,       // no per-module state
    nullptr,  // no functions
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC MLRA_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&mlra_module); }
