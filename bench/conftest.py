"""pytest-benchmark runs in bench/: record versions and the command with the results, never keep a JSON
file from a run in which a case failed, and mark the commit dirty only for code changes."""

import os
import pathlib
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the source tree is importable however pytest is started
    sys.path.insert(0, str(ROOT))


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from mlra_kernels.benchmarks.common import env_metadata

    meta = env_metadata("cpu")
    machine_info.update({k: meta[k] for k in ("device", "torch", "triton", "cuda", "threads")})
    machine_info["command"] = shlex.join(["pytest", *sys.argv[1:]])
    machine_info["torch_threads"] = torch.get_num_threads()


def pytest_benchmark_update_commit_info(config, commit_info):
    # The same rule as the other benchmarks: result files waiting to be committed do not make the code dirty.
    from mlra_kernels.benchmarks.common import _git_commit

    commit_info["dirty"] = _git_commit().endswith("-dirty")


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_sessionfinish(session, exitstatus):
    yield  # pytest-benchmark writes its JSON here
    path = session.config.getoption("benchmark_json", None)
    if session.testsfailed and path is not None:
        name = os.fspath(path)
        try:
            os.remove(name)
        except OSError:
            return
        print(f"\nbench: {session.testsfailed} case(s) failed, so {name} was removed: no partial results")
