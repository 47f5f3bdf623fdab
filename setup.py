"""Build of mlra-kernels and its compiled extension mlra_kernels._C.

_C is built on LibTorch's stable ABI (torch/csrc/stable, targeting torch TORCH_MIN) and Python's limited
C API (abi3, PY_LIMITED_API), so one build works with every torch from TORCH_MIN on, CPU and CUDA builds
alike, and with every CPython the wheel's abi3 tag admits: the wheel is tagged cp39-abi3 and requires
torch>=TORCH_MIN. It links libtorch_cpu's C shims only; the CUDA part carries its own CUDA runtime
(linked statically), so a CPU-only torch loads it too.

The CPU part is always built. The CUDA part is built when the installed torch has CUDA (torch.version.cuda)
and a CUDA toolkit with nvcc is found; no GPU is needed. Switches (environment variables):

    MLRA_SKIP_CUDA_BUILD=1   build the CPU part only
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;8.6;8.9;9.0+PTX")
    MAX_JOBS                 parallel compile jobs (read by torch's ninja build)
    DEBUG=1                  -O0 -g (and -G for device code) instead of -O3

Development install:  pip install --no-build-isolation -e .
Wheel:                pip wheel --no-build-isolation --no-deps -w dist .
(With build isolation pip builds against the newest torch of pyproject.toml's range; the result works with
every torch from TORCH_MIN on all the same.)
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch guesses it from `which nvcc`.

    torch takes dirname(dirname(which nvcc)); a wrapper script such as /usr/local/bin/nvcc then yields
    /usr/local, which has no CUDA headers. An explicit CUDA_HOME / CUDA_PATH is always respected.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime_api.h")
        ):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

CSRC = ROOT / "csrc"
BUILD_INFO = ROOT / "mlra_kernels" / "_build_info.json"
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
# The oldest torch _C works with: the stable-ABI version the sources target (TORCH_TARGET_VERSION), the
# wheel's torch requirement, and what mlra_kernels._ext checks at load. CMakeLists.txt and
# tests/sanitize/fuzz_ops.py read it from here; pyproject.toml's build requirement states it too.
TORCH_MIN = "2.11"
# Python's limited API: the oldest CPython the abi3 wheel is for (the wheel tag and Py_LIMITED_API).
PY_LIMITED_API = "cp39"


def torch_target_version(version: str = TORCH_MIN) -> str:
    """TORCH_TARGET_VERSION for torch `version` ("2.11" -> 0x020b000000000000, torch/csrc/stable/version.h)."""
    major, minor = (int(p) for p in version.split(".")[:2])
    return f"0x{(major << 56) | (minor << 48):016x}"


def py_limited_api_hex(tag: str = PY_LIMITED_API) -> str:
    """Py_LIMITED_API for an abi3 tag ("cp39" -> 0x03090000)."""
    major, minor = int(tag[2]), int(tag[3:])
    return f"0x{major:02x}{minor:02x}0000"


def read_sources() -> dict[str, list[str]]:
    """csrc/sources.txt: the one list of compiled sources, by section ([cpu], [cuda], [python])."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (CSRC / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is None:
            raise RuntimeError(f"csrc/sources.txt: {line!r} is outside a [section]")
        else:
            current.append(str(CSRC / line))
    return sections


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    if not home:
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    return nvcc if os.path.exists(nvcc) else None


def want_cuda() -> tuple[bool, str]:
    if env_flag("MLRA_SKIP_CUDA_BUILD"):
        return False, "MLRA_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if find_nvcc() is None:
        return False, "no nvcc found (set CUDA_HOME)"
    return True, f"nvcc at {find_nvcc()}"


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the pip CUDA wheels (nvidia/cu13/include, ...), which torch's CUDA headers may need
    (cusparse.h, cublas_v2.h) when the system toolkit lacks them."""
    roots = set(site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]])
    found = []
    for root in sorted(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) and inc not in found:
                found.append(inc)
    return found


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "release" in line:
            return line.split("release", 1)[1].split(",", 1)[0].strip()
    return None


def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def build_info(with_cuda: bool, reason: str, arch_list: str | None, debug: bool) -> dict:
    nvcc = find_nvcc() if with_cuda else None
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "with_cuda": with_cuda,
        "cuda_reason": reason,
        "cuda_arch_list": arch_list,
        "nvcc": nvcc_version(nvcc) if nvcc else None,
        "debug": debug,
        "python": sys.version.split()[0],
        # On the stable ABI _C works with every torch from torch_min on (mlra_kernels._ext checks it), and
        # with every CPython from python_abi's on.
        "stable_abi": True,
        "torch_min": TORCH_MIN,
        "python_abi": f"{PY_LIMITED_API}-abi3",
    }


BUILD_INFO_RECORD: dict = {}


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) that also writes _build_info.json next to the built _C, so an
    in-place / editable build and a wheel each carry the record of exactly what was compiled."""

    def _add_compile_flag(self, extension, flag) -> None:
        # torch adds its own -DPy_LIMITED_API (its oldest CPython) to a py_limited_api extension; ours, which
        # matches the wheel's abi3 tag, is already in the flags.
        if flag.startswith("-DPy_LIMITED_API="):
            return
        super()._add_compile_flag(extension, flag)

    def run(self):
        super().run()
        for ext in self.extensions:
            built = pathlib.Path(self.get_ext_fullpath(ext.name))
            out_dir = built.parent
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / BUILD_INFO.name).write_text(json.dumps(BUILD_INFO_RECORD, indent=2) + "\n")
            # An in-place build from before the abi3 build left _C.cpython-*.so, which Python would import
            # first; only the file just built may stay.
            stem = ext.name.rsplit(".", 1)[-1]
            for old in out_dir.glob(f"{stem}.*"):
                if old.suffix in (".so", ".pyd") and old.name != built.name:
                    old.unlink()


def extensions():
    sources = read_sources()
    with_cuda, reason = want_cuda()
    debug = env_flag("DEBUG")
    arch_list = None
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    print(f"mlra-kernels: building _C with CUDA={with_cuda} ({reason}); arch list {arch_list}; DEBUG={debug}")
    BUILD_INFO_RECORD.update(build_info(with_cuda, reason, arch_list, debug))

    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch picks the language standard its headers need (C++17 or C++20). Threads come from
    # torch::stable::parallel_for, which runs torch's own thread pool: no -fopenmp here.
    stable = [f"-DTORCH_TARGET_VERSION={torch_target_version()}", f"-DPy_LIMITED_API={py_limited_api_hex()}"]
    cxx = opt + stable + (["-DMLRA_DEBUG"] if debug else [])
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]  # tev_cuda.cu includes no torch or Python header
    files = sources["cpu"] + sources["python"]
    kwargs = dict(include_dirs=[str(CSRC)], py_limited_api=True)
    # Only libtorch_cpu, the home of the stable C shims: _C references no C++ symbol of libtorch, and never
    # torch_python (Python's limited API), c10_cuda or torch_cuda (so that a CPU-only torch loads it).
    libraries = ["torch_cpu"]
    if with_cuda:
        files += sources["cuda"]
        cxx.append("-DMLRA_WITH_CUDA")
        nvcc.append("-DMLRA_WITH_CUDA")
        for inc in pip_cuda_include_dirs():
            # After the toolkit's own headers, so the toolkit wins where both have a header.
            # (tev_cuda.cu includes no torch headers, so nvcc does not need them.)
            cxx += ["-idirafter", inc]
        # The CUDA runtime linked in, its symbols kept inside _C: no libcudart.so of one CUDA version to find
        # at load, and torch's own runtime (any CUDA version) is left alone. The kernels run on any driver
        # that supports the toolkit's CUDA version.
        libraries += ["cudart_static", "dl", "rt", "pthread"]
        ext = cpp_extension.CUDAExtension("mlra_kernels._C", files, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                          extra_link_args=["-Wl,--exclude-libs,libcudart_static.a"], **kwargs)
    else:
        ext = cpp_extension.CppExtension("mlra_kernels._C", files, extra_compile_args={"cxx": cxx}, **kwargs)
    ext.libraries = libraries
    return [ext]


# The transformers releases the Hugging Face integration supports; .ci/run tests both ends of the range.
# mlra_kernels/integrations/transformers.py reads the same range (SUPPORTED_TRANSFORMERS) for its message.
TRANSFORMERS = "transformers>=5.0,<6"

setup(
    name="mlra-kernels",
    version="0.1.0",
    description="Fused kernels for Multi-head Low-Rank Attention (MLRA) and Token Embedding Variability (TEV)",
    python_requires=">=3.10",  # torch 2.11, the oldest supported, needs 3.10
    packages=find_packages(include=["mlra_kernels", "mlra_kernels.*"]),
    package_data={"mlra_kernels": ["_build_info.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}},
    install_requires=[
        f"torch>={TORCH_MIN}",
        "triton; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # accelerate: transformers' Trainer needs it (tests/integrations/test_transformers.py);
        # lightning: the Lightning callback is tested in a real Trainer; hypothesis: the property tests;
        # tokenizers: the BPE vocabulary of the experiment.
        "test": ["pytest", "pytest-benchmark", "hypothesis", TRANSFORMERS, "safetensors", "accelerate", "lightning",
                 "tokenizers"],
        "transformers": [TRANSFORMERS, "safetensors", "accelerate>=1.1"],  # accelerate: for transformers' Trainer
        "lightning": ["lightning"],
        # experiments/tev_repro.py: the byte-level BPE vocabulary (mlra_kernels.data)
        "experiments": ["tokenizers"],
        "hf": [TRANSFORMERS, "safetensors", "accelerate>=1.1"],  # alias of "transformers"
        # the documentation site (mkdocs.yml; .ci/run builds it with --strict). The lowest versions that
        # build it: mkdocs 1.6 (link and anchor validation), and the Python handler 1.17, the first whose
        # options take griffe's warn_unknown_params / warn_missing_types.
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.30", "mkdocstrings-python>=1.17"],
    },
    entry_points={"console_scripts": ["mlra = mlra_kernels.cli:main"]},
    zip_safe=False,
)
