"""Build plumbing: one source list, build info, `python -m mlra_kernels.info`."""

import os
import pathlib
import subprocess
import sys

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


def test_extension_matches_running_torch():
    mod = _ext.load()
    assert mod.torch_version == torch.__version__.split("+")[0]
    rec = _ext.build_info_file()
    assert rec is not None and rec["torch"] == torch.__version__
    assert rec["with_cuda"] == mod.with_cuda


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
