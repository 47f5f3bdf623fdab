"""`import mlra_kernels` touches no GPU and survives a missing or mismatched extension."""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_py(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=240
    )


def test_import_with_cuda_unusable():
    # Any CUDA initialisation raises; import and a CPU TEV must still work.
    out = run_py(
        """
        import torch, torch.cuda
        def boom(*a, **k):
            raise RuntimeError("CUDA must not be touched")
        torch.cuda._lazy_init = boom
        torch.cuda.init = boom
        torch.cuda.is_available = boom
        torch.cuda.device_count = boom
        torch._C._cuda_init = boom
        import mlra_kernels
        from mlra_kernels import tev, TEVStats
        s = tev(torch.randn(64, 16))
        assert isinstance(s, TEVStats) and s.rows == 64
        assert not torch.cuda.is_initialized()
        print("ok")
        """,
        CUDA_VISIBLE_DEVICES="",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


BLOCK_C = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mlra_kernels._C":
            raise {exc}
sys.meta_path.insert(0, Block())
"""


def test_missing_extension_message():
    out = run_py(
        BLOCK_C.format(exc='ModuleNotFoundError("No module named \'mlra_kernels._C\'", name="mlra_kernels._C")')
        + textwrap.dedent(
            """
            import torch, mlra_kernels
            assert mlra_kernels.__version__
            try:
                mlra_kernels.tev(torch.randn(4, 4))
            except ImportError as err:
                print("MSG:", err)
            """
        )
    )
    assert out.returncode == 0, out.stderr
    assert "MSG:" in out.stdout and "not built" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout


def test_undefined_symbol_becomes_rebuild_message():
    out = run_py(
        BLOCK_C.format(exc='ImportError("_C.so: undefined symbol: _ZN3c104cuda20getCurrentCUDAStreamEa")')
        + textwrap.dedent(
            """
            import torch, mlra_kernels
            try:
                mlra_kernels.tev(torch.randn(4, 4))
            except ImportError as err:
                print("MSG:", err)
            """
        )
    )
    assert out.returncode == 0, out.stderr
    assert "does not match the installed torch" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
    assert "Traceback" not in out.stdout


def test_torch_version_mismatch_message():
    out = run_py(
        """
        import torch
        torch.__version__ = "0.0.1"
        import mlra_kernels
        try:
            mlra_kernels.tev(torch.randn(4, 4))
        except ImportError as err:
            print("MSG:", err)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "built against torch" in out.stdout and "0.0.1 is installed" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
