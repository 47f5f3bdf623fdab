"""Build plumbing: one source list, build info, `python -m mlra_kernels.info`."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mlra_kernels import _ext, info

REPO = pathlib.Path(__file__).resolve().parents[1]


def listed_sources():
    sections, current = {}, None
    for raw in (REPO / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        elif line:
            current.append(line)
    return sections


def test_sources_txt_is_the_whole_source_list():
    sections = listed_sources()
    assert set(sections) == {"cpu", "cuda", "python"}
    listed = {p for files in sections.values() for p in files}
    on_disk = {
        str(p.relative_to(REPO / "csrc"))
        for p in (REPO / "csrc").rglob("*")
        if p.suffix in (".cpp", ".cu") and "tests" not in p.parts
    }
    assert listed == on_disk
    assert all(p.endswith((".cu", ".cpp")) for p in sections["cuda"])
    assert not any(p.endswith(".cu") for p in sections["cpu"] + sections["python"])


def test_extension_is_on_the_stable_abi_and_fits_the_running_torch():
    _ext.load()
    rec = _ext.build_info_file()
    assert rec is not None and rec["stable_abi"] is True
    assert rec["torch"] == torch.__version__  # the in-place build of this checkout
    assert _ext._major_minor(torch.__version__) >= _ext._major_minor(rec["torch_min"])
    assert rec["python_abi"] == "cp39-abi3"
    assert _ext.built_with_cuda() == rec["with_cuda"]


def test_the_torch_minimum_is_stated_once_and_agrees_everywhere():
    setup_py = (REPO / "setup.py").read_text()
    minimum = re.search(r'^TORCH_MIN = "([0-9.]+)"$', setup_py, re.M).group(1)
    assert _ext.build_info_file()["torch_min"] == minimum
    assert f'"torch>={minimum}"' in (REPO / "pyproject.toml").read_text()  # the isolated build's torch


def test_extension_links_no_cpp_symbol_of_torch():
    """On the stable ABI _C calls torch through its C shims only: no c10 / ATen / torch C++ symbol, no
    libtorch_python (Python's limited API), and no CUDA library of torch or a CUDA runtime to find at load
    (a CPU-only torch loads it)."""
    so = next(p for p in (REPO / "mlra_kernels").glob("_C.*") if p.suffix == ".so")
    assert so.name == "_C.abi3.so", so.name
    nm, readelf = shutil.which("nm"), shutil.which("readelf")
    if nm is None or readelf is None:
        pytest.skip("binutils (nm, readelf) not installed")
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(so)], capture_output=True, text=True,
                               check=True).stdout.split()
    cpp_torch = [s for s in undefined if s.startswith(("_ZN3c10", "_ZN2at", "_ZN5torch", "_ZNK3c10", "_ZNK2at"))]
    assert cpp_torch == []
    py = [s for s in undefined if s.startswith("Py") and not s.startswith("PyModule_Create")]
    assert py == []
    needed = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True, check=True).stdout
    libs = re.findall(r"Shared library: \[([^\]]+)\]", needed)
    assert "libtorch_cpu.so" in libs
    assert not [lib for lib in libs if "cuda" in lib or "torch_python" in lib or lib in ("libc10.so", "libtorch.so")]


def test_build_info_keys():
    b = info.build_info()
    assert b["extension"] == "ok"
    assert isinstance(b["cuda"], bool) and isinstance(b["cuda_archs"], list)
    if b["cuda"]:
        assert b["cuda_archs"] and b["cuda_version"]
    else:
        assert b["cuda_archs"] == []


def test_info_command_prints_versions():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-m", "mlra_kernels.info"], capture_output=True, text=True, env=env, timeout=240
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"running {torch.__version__}" in text
    assert "built against" in text and "triton" in text
    assert "_C" in text and "GPU" in text
