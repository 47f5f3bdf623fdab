"""pytest-benchmark runs in bench/: record the torch / Triton / CUDA versions and the command with the results."""

import sys


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from bench.common import env_metadata

    meta = env_metadata("cpu")
    machine_info.update({k: meta[k] for k in ("device", "torch", "triton", "cuda", "threads")})
    machine_info["command"] = " ".join(["pytest", *sys.argv[1:]])
    machine_info["torch_threads"] = torch.get_num_threads()


def pytest_benchmark_update_commit_info(config, commit_info):
    # The same rule as the other benchmarks: result files waiting to be committed do not make the code dirty.
    from bench.common import _git_commit

    commit_info["dirty"] = _git_commit().endswith("-dirty")
