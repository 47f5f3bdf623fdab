"""The Triton interpreter's known incompatibility is reported up front, with what to install."""

import pytest

pytest.importorskip("triton", reason="the Triton interpreter check needs triton")

from mlra_kernels.ops.mlra import launcher  # noqa: E402
from mlra_kernels.ops.mlra.backend import triton_interpreted  # noqa: E402


@pytest.mark.parametrize(
    "text, expected",
    [("3.6.0", (3, 6, 0)), ("3.8.0+git1a2b", (3, 8, 0)), ("2.4.0rc1", (2, 4, 0)), ("2.3", (2, 3)), ("dev", ())],
)
def test_version_parsing(text, expected):
    assert launcher._version(text) == expected


@pytest.mark.parametrize("triton_version, numpy_version", [("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.8.0", "2.5.0")])
def test_working_combinations_pass(triton_version, numpy_version):
    launcher.check_interpreter(triton_version, numpy_version)


@pytest.mark.parametrize("triton_version, numpy_version", [("3.6.0", "2.4.0"), ("3.5.1", "2.4.6")])
def test_old_triton_with_new_numpy_raises_with_the_fix(triton_version, numpy_version):
    with pytest.raises(RuntimeError, match=r"numpy<2\.4.*triton>=3\.7.*unset TRITON_INTERPRET") as err:
        launcher.check_interpreter(triton_version, numpy_version)
    assert triton_version in str(err.value) and numpy_version in str(err.value)


def test_the_installed_pair_is_checked_on_the_interpreted_path(monkeypatch):
    """The public call on CPU tensors under the interpreter runs the check first."""
    import torch

    import mlra_kernels

    if not triton_interpreted():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launcher, "check_interpreter", lambda: (_ for _ in ()).throw(RuntimeError("checked")))
    launcher.check_interpreter_once.cache_clear()  # the check runs once per process; forget an earlier pass
    x = torch.randn(1, 4, 8)
    try:
        with pytest.raises(RuntimeError, match="checked"):
            mlra_kernels.mlra_attention(x, torch.randn(6, 8), torch.randn(3, 8, 2), num_heads=2)
        with pytest.raises(RuntimeError, match="checked"):  # a failed check is not remembered as a pass
            mlra_kernels.mlra_attention(x, torch.randn(6, 8), torch.randn(3, 8, 2), num_heads=2)
    finally:
        launcher.check_interpreter_once.cache_clear()
