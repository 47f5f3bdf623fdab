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


def test_a_torch_older_than_the_stable_abi_target_is_refused():
    out = run_py(
        """
        import torch
        torch.__version__ = "2.10.0"
        import mlra_kernels
        try:
            mlra_kernels.tev(torch.randn(4, 4))
        except ImportError as err:
            print("MSG:", err)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "built against torch" in out.stdout and "2.10.0 is installed" in out.stdout
    assert "works with torch 2.11 or newer" in out.stdout and "pip install 'torch>=2.11'" in out.stdout


def test_any_torch_from_the_stable_abi_target_on_is_accepted():
    """A build on the stable ABI is not tied to the torch it was compiled against."""
    out = run_py(
        """
        import torch
        torch.__version__ = "2.99.0+cpu"
        import mlra_kernels
        s = mlra_kernels.tev(torch.randn(64, 16))
        assert s.rows == 64
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_a_build_from_before_the_stable_abi_needs_its_own_torch(tmp_path):
    """A record without stable_abi (an older in-place build): another torch is refused with how to rebuild."""
    pkg = tmp_path / "mlra_kernels"
    pkg.mkdir()
    for name in ("__init__.py", "_ext.py"):
        (pkg / name).write_text((REPO / "mlra_kernels" / name).read_text())
    (pkg / "_build_info.json").write_text('{"torch": "2.9.0+cu128", "with_cuda": true}')
    out = subprocess.run(
        [sys.executable, "-c",
         ("from mlra_kernels import _ext\ntry:\n    _ext.load()\nexcept ImportError as err:\n    print('MSG:', err)")],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(tmp_path)), cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "built against torch 2.9.0+cu128 but torch" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
