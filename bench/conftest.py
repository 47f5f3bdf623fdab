"""pytest-benchmark runs in bench/: record versions and the command with the results, never keep a JSON
file from a run in which a case failed, and mark the commit dirty only for code changes.

pytest-benchmark writes --benchmark-json=PATH here under a temporary name next to PATH; it is renamed to
PATH only when every case passed, so a failed or interrupted run leaves an earlier result as it was."""

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


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # tryfirst: this wraps pytest-benchmark's own wrapper, which writes the JSON before its yield.
    bs = getattr(session.config, "_benchmarksession", None)
    path = getattr(bs, "json", None)
    tmp = None
    if path is not None:
        path = pathlib.Path(os.fspath(path))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        bs.json = tmp
    outcome = yield
    if tmp is None:
        return
    bs.json = path
    failed = session.testsfailed or exitstatus != 0 or outcome.excinfo is not None
    if not tmp.exists():
        return  # nothing was benchmarked: pytest-benchmark wrote nothing, and PATH is untouched
    if failed:
        os.remove(tmp)
        kept = f"; {path} was left as it was" if path.exists() else ""
        print(f"\nbench: {session.testsfailed} case(s) failed or the run stopped, so no results were written{kept}")
        return
    os.replace(tmp, path)
    print(f"\nbench: results written to {path}")
