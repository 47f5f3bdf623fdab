"""Kernel benchmarks, shipped with the package so that ``mlra bench`` works from an installed wheel.

- ``python -m mlra_kernels.benchmarks.tev``: the TEV reduction against the torch one-liner and ``E.sum()``.
- ``python -m mlra_kernels.benchmarks.mlra``: fused MLRA against unfused MLRA and standard MHA.

``bench/bench_tev.py`` and ``bench/bench_mlra.py`` in the source checkout run the same code. Results are
JSON files with the device, versions and commit (``common.write_results``).
"""
