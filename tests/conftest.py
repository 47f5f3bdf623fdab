"""Shared pytest setup: the Triton interpreter on CPU machines, `gpu` tests skipped with a reason, NaN poison."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The one place the suite sets Triton's mode, before anything imports triton (which reads it then):
    # without a GPU the kernel tests run the Triton kernels under the interpreter, in any import order.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        # Import it now, so that its mode is fixed whatever runs first: a test that sets TRITON_INTERPRET=0
        # for the torch path (the fixtures named reference_path) would otherwise import it compiled when
        # it runs before every kernel test, as when one test file is run alone.
        import triton.language  # noqa: F401
    except ImportError:  # no Triton: the kernel tests skip and say so
        pass


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def poison_empty():
    """Make torch.empty (also inside C++ ops) fill float outputs with NaN, so unwritten elements show."""
    import torch.utils.deterministic

    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
