"""`mlra demo` with a tiny configuration, and its embedded default data."""

import json
import math
import os

import pytest

from mlra_kernels import demo
from mlra_kernels.cli import main
from mlra_kernels.monitor import read_jsonl

@pytest.fixture
def reference_path(monkeypatch):
    """Run mlra_attention's pure-torch path on CPU: this test is about the demo, not the kernels, which
    the Triton interpreter (TRITON_INTERPRET=1, set by the kernel tests) would make slow."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


TINY = ["--steps", "6", "--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch", "2",
        "--log-every", "2", "--eval-batches", "2", "--max-bytes", "60000", "--no-progress", "--device", "cpu"]


def test_default_data_is_the_stdlib_in_a_fixed_order():
    files = demo.stdlib_text_files()
    assert len(files) > 100 and files == demo.stdlib_text_files()
    assert not any("site-packages" in f for f in files)
    tokens, source = demo.load_bytes(max_bytes=50_000)
    assert tokens.numel() >= 50_000 - 1000 and int(tokens.max()) < 256 and tokens.dtype.is_floating_point is False
    assert "standard library" in source


@pytest.mark.usefixtures("reference_path")
def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", *TINY, "--out", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    for word in ("train loss", "val ppl", "µ_TEV", "σ_TEV", "tokens/s", "params", "MHA", "MLRA"):
        assert word in text
    assert str(out / "demo.png") in text and str(out / "mha.jsonl") in text
    summary = json.loads((out / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["results"]}
    assert set(by_name) == {"MHA", "MLRA"}
    assert by_name["MLRA"]["params"] < by_name["MHA"]["params"]
    for name, r in by_name.items():
        assert math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 < r["tev_mean"] < 1 and r["tokens_per_s"] > 0
        meta, records = read_jsonl(out / f"{name.lower()}.jsonl")
        assert meta["name"] == name and [rec["step"] for rec in records] == [0, 2, 4, 5]
        assert r["tev_mean"] == records[-1]["tev_mean"]
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.usefixtures("reference_path")
def test_demo_same_seed_same_result_and_user_data(tmp_path, capsys):
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    (text / "b.md").write_text("lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 200)
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert main(["demo", *TINY, "--data", str(text), "--out", str(out)]) == 0
        runs.append(json.loads((out / "summary.json").read_text())["results"])
    assert "corpus: 2 files" in capsys.readouterr().out
    for a, b in zip(*runs):
        assert a["val_loss"] == b["val_loss"] and a["tev_mean"] == b["tev_mean"]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", *TINY, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file or folder" in _one_line(capsys.readouterr().err)
    assert main(["demo", *TINY, "--heads", "3", "--out", str(tmp_path / "o")]) == 1
    assert "--heads 3 must divide --width 16" in _one_line(capsys.readouterr().err)
    assert main(["demo", *TINY, "--rank", "17", "--out", str(tmp_path / "o")]) == 1
    assert "--rank 17 must be at most --width 16" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,expected", [
    ("--steps", "0", "expected a positive integer, got 0"),
    ("--max-bytes", "-1", "expected a positive integer, got -1"),
    ("--batch", "-2", "expected a positive integer"),
    ("--layers", "0", "expected a positive integer"),
    ("--width", "0", "expected a positive integer"),
    ("--heads", "0", "expected a positive integer"),
    ("--context", "0", "expected a positive integer"),
    ("--rank", "0", "expected a positive integer"),
    ("--groups", "-1", "expected a positive integer"),
    ("--log-every", "0", "expected a positive integer"),
    ("--eval-batches", "0", "expected a positive integer"),
    ("--steps", "1.5", "expected a positive integer, got '1.5'"),
    ("--lr", "-1e-3", "expected a positive number"),
    ("--lr", "nan", "expected a positive number"),
    ("--seed", "-1", "expected an integer in [0, 2**63)"),
    ("--device", "foo", "expected cpu, cuda or cuda:N, got 'foo'"),
    ("--device", "meta", "expected cpu, cuda or cuda:N, got 'meta'"),
    ("--device", "cuda:x", "expected cpu, cuda or cuda:N"),
])
def test_demo_flag_values_are_checked_by_argparse(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *TINY, f"{flag}={value}", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {expected}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_demo_run_checks_a_namespace_built_by_hand(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args([*TINY, "--out", str(tmp_path / "o")])
    args.max_bytes = -1
    with pytest.raises(ValueError, match="--max-bytes must be positive, got -1"):
        demo.run(args)
    args.max_bytes, args.device = 60000, "meta"
    with pytest.raises(ValueError, match="--device: expected cpu, cuda or cuda:N"):
        demo.run(args)
    with pytest.raises(ValueError, match="--max-bytes must be a positive int"):
        demo.load_bytes(max_bytes=0)
    assert not (tmp_path / "o").exists()


def test_demo_unreadable_user_file_is_an_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("some text " * 1000)
    (tmp_path / "b.txt").write_text("more text " * 1000)
    real_open = open

    def deny(path, *a, **kw):
        if str(path).endswith("b.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(demo, "open", deny, raising=False)
    assert main(["demo", *TINY, "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "--data: cannot read" in line and "b.txt" in line and "Permission denied" in line


OLD_RUN = {"mha.jsonl": b"old mha log\n", "mlra.jsonl": b"old mlra log\n", "summary.json": b'{"old": true}',
           "demo.png": b"old plot"}


def _old_run(folder):
    folder.mkdir()
    for name, data in OLD_RUN.items():
        (folder / name).write_bytes(data)


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_demo_out_policy(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["demo", *TINY, "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in _one_line(capsys.readouterr().err)
    assert (tmp_path / "file").read_text() == "mine"
    assert main(["demo", *TINY, "--out", str(tmp_path / "file" / "run")]) == 1
    assert f"{tmp_path / 'file'} is a file, so the folder cannot be made there" in _one_line(capsys.readouterr().err)

    _old_run(tmp_path / "old")
    assert main(["demo", *TINY, "--out", str(tmp_path / "old")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"--out {tmp_path / 'old'} already holds files" in line and "--overwrite" in line
    assert _contents(tmp_path / "old") == OLD_RUN

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "summary.json").write_text("{}")
    assert main(["demo", *TINY, "--out", str(mine), "--overwrite"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "holds files a demo run does not write (notes.txt)" in line
    assert (mine / "notes.txt").read_text() == "my notes"

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "old")
        assert main(["demo", *TINY, "--out", ".", "--overwrite"]) == 1
        assert "is the current folder or one above it" in _one_line(capsys.readouterr().err)
    finally:
        os.chdir(cwd)
    assert _contents(tmp_path / "old") == OLD_RUN
    assert sorted(os.listdir(tmp_path)) == ["file", "mine", "old"]


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("failure,rc,message", [(RuntimeError("disk on fire"), 1, "RuntimeError: disk on fire"),
                                                 (KeyboardInterrupt(), 130, "interrupted")])
@pytest.mark.parametrize("existing", ["old run", "nothing"])
def test_demo_crash_leaves_out_as_it_was(tmp_path, capsys, monkeypatch, failure, rc, message, existing):
    """A run that fails half-way leaves no partial files: an earlier run in --out is untouched (even
    with --overwrite), a new --out is not created, and the run's own temporary folder is removed."""
    out = tmp_path / "run"
    if existing == "old run":
        _old_run(out)
    real_lr = demo._lr
    seen = []

    def lr_then_fail(step, *a):
        if step == 3:
            seen.append(sorted(os.listdir(tmp_path)))
            if existing == "old run":
                assert _contents(out) == OLD_RUN  # the new logs are not written into --out
            raise failure
        return real_lr(step, *a)

    monkeypatch.setattr(demo, "_lr", lr_then_fail)
    assert main(["demo", *TINY, "--out", str(out), "--overwrite"]) == rc
    assert message in _one_line(capsys.readouterr().err)
    assert any(n.startswith("run.incomplete-") for n in seen[0])  # the run was writing beside --out
    if existing == "old run":
        assert os.listdir(tmp_path) == ["run"] and _contents(out) == OLD_RUN
    else:
        assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("reference_path")
def test_demo_overwrite_replaces_an_earlier_run_once_complete(tmp_path, capsys):
    out = tmp_path / "run"
    _old_run(out)
    assert main(["demo", *TINY, "--out", str(out), "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert os.listdir(tmp_path) == ["run"]
    assert sorted(os.listdir(out)) == sorted(OLD_RUN)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["out"] == str(out) and [r["log"] for r in summary["results"]] == [
        str(out / "mha.jsonl"), str(out / "mlra.jsonl")]
    assert read_jsonl(out / "mha.jsonl")[0]["name"] == "MHA"
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    # the summary says what one short run can and cannot show
    assert "not evidence either way" in summary["caveat"] and "one seed" in summary["caveat"]
    assert "not evidence either" in text and "one seed" in text


def test_publish_puts_the_earlier_run_back_when_the_move_fails(tmp_path, monkeypatch):
    out, staging = tmp_path / "run", tmp_path / "run.incomplete-x"
    _old_run(out)
    staging.mkdir()
    (staging / "summary.json").write_text('{"new": true}')
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(staging):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(demo.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        demo._publish(str(staging), str(out))
    assert _contents(out) == OLD_RUN and _contents(staging) == {"summary.json": b'{"new": true}'}
    assert sorted(os.listdir(tmp_path)) == ["run", "run.incomplete-x"]


@pytest.mark.usefixtures("reference_path")
def test_demo_keeps_a_completed_run_it_cannot_move_into_place(tmp_path, capsys, monkeypatch):
    def fail(staging, out):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(demo, "_publish", fail)
    assert main(["demo", *TINY, "--out", str(tmp_path / "run")]) == 1
    line = _one_line(capsys.readouterr().err)
    (kept,) = os.listdir(tmp_path)
    assert kept.startswith("run.incomplete-") and str(tmp_path / kept) in line and "kept there" in line
    assert sorted(os.listdir(tmp_path / kept)) == sorted(OLD_RUN)


def test_publish_into_an_empty_or_new_folder(tmp_path):
    for out in (tmp_path / "empty", tmp_path / "new"):
        if out.name == "empty":
            out.mkdir()
        staging = tmp_path / f"{out.name}.incomplete-x"
        staging.mkdir()
        (staging / "summary.json").write_text("{}")
        demo.check_out(str(out), overwrite=False)
        demo._publish(str(staging), str(out))
        assert _contents(out) == {"summary.json": b"{}"} and not staging.exists()
