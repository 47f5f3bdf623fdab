"""`mlra tev`, `mlra plot`, `mlra bench` and `mlra` itself on bad input: one line on stderr naming the
file or flag, a non-zero exit status, no traceback, and nothing written or overwritten."""

import json
import os
import warnings

import pytest
import torch

from mlra_kernels import cli
from mlra_kernels.cli import main


def _one_line_error(capsys, *parts):
    """The captured stderr is one error line holding every part."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _fails(capsys, argv, *parts, rc=1):
    assert main(argv) == rc
    return _one_line_error(capsys, *parts)


# ---------------------------------------------------------------- mlra tev: files that cannot be loaded


@pytest.fixture
def safetensors_file(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors is an optional dependency")
    path = tmp_path / "good.safetensors"
    st.save_file({"wte.weight": torch.randn(10, 4), "h.0.w": torch.randn(4, 4)}, str(path))
    return path


def test_tev_corrupt_truncated_and_empty_safetensors(tmp_path, capsys, safetensors_file):
    data = safetensors_file.read_bytes()
    cases = {
        "half.safetensors": data[: len(data) // 2],
        "header.safetensors": data[:5],
        "garbage.safetensors": (16).to_bytes(8, "little") + b"{not json at all" + b"x" * 40,
        "huge.safetensors": (10**12).to_bytes(8, "little") + b"{}",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        _fails(capsys, ["tev", str(tmp_path / name)], str(tmp_path / name), "not a valid safetensors file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _fails(capsys, ["tev", str(tmp_path / "empty.safetensors")], str(tmp_path / "empty.safetensors"),
           "is empty (0 bytes)")


def _index(folder, content):
    folder.mkdir(exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "model.safetensors.index.json").write_text(text)
    return str(folder / "model.safetensors.index.json")


def test_tev_bad_sharded_index(tmp_path, capsys, safetensors_file):
    for name, content in (("no_map", {"metadata": {}}), ("a_list", [1, 2]), ("map_list", {"weight_map": [1]}),
                          ("map_ints", {"weight_map": {"wte.weight": 3}}), ("empty_map", {"weight_map": {}})):
        index = _index(tmp_path / name, content)
        _fails(capsys, ["tev", str(tmp_path / name)], index, "no usable 'weight_map'")
    index = _index(tmp_path / "not_json", "{nope")
    _fails(capsys, ["tev", str(tmp_path / "not_json")], index, "is not valid JSON", "line 1")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "model.safetensors.index.json").write_bytes(b"\xff\xfe\x00garbage")
    _fails(capsys, ["tev", str(tmp_path / "binary")], "model.safetensors.index.json", "not UTF-8")

    index = _index(tmp_path / "missing", {"weight_map": {"wte.weight": "model-00001-of-00002.safetensors"}})
    _fails(capsys, ["tev", str(tmp_path / "missing")], index, "model-00001-of-00002.safetensors", "is missing")

    index = _index(tmp_path / "outside", {"weight_map": {"wte.weight": "../good.safetensors"}})
    _fails(capsys, ["tev", str(tmp_path / "outside")], index, "outside")

    folder = tmp_path / "no_key"
    index = _index(folder, {"weight_map": {"wte.weight": "a.safetensors"}})
    pytest.importorskip("safetensors.torch").save_file({"other": torch.randn(2, 2)}, str(folder / "a.safetensors"))
    _fails(capsys, ["tev", str(folder)], index, "a.safetensors", "does not hold it")

    folder = tmp_path / "good_index"
    _index(folder, {"weight_map": {"wte.weight": "s.safetensors"}})
    (folder / "s.safetensors").write_bytes(safetensors_file.read_bytes())
    assert main(["tev", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [10, 4]


def test_tev_refuses_a_crafted_pickle_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"wte.weight": Payload()}, tmp_path / "evil.pt")
    line = _fails(capsys, ["tev", str(tmp_path / "evil.pt")], str(tmp_path / "evil.pt"), "refused",
                  "weights_only=True")
    assert "weights_only` set to `False`" not in line  # torch's advice to turn the protection off is not passed on
    assert not marker.exists()


def test_tev_truncated_empty_and_non_finite_checkpoints(tmp_path, capsys):
    torch.save({"wte.weight": torch.randn(50, 8)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    _fails(capsys, ["tev", str(tmp_path / "half.pt")], str(tmp_path / "half.pt"), "cannot read")
    (tmp_path / "empty.bin").write_bytes(b"")
    _fails(capsys, ["tev", str(tmp_path / "empty.bin")], str(tmp_path / "empty.bin"), "is empty (0 bytes)")
    torch.save({"wte.weight": torch.full((4, 3), float("nan"))}, tmp_path / "nan.pt")
    _fails(capsys, ["tev", str(tmp_path / "nan.pt"), "--json"], "every row of wte.weight (4 of 4)", "NaN or Inf")
    torch.save({"wte.weight": torch.randn(50, 8)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.pt").write_bytes((tmp_path / "legacy.pt").read_bytes()[:60])  # the old format, cut short
    _fails(capsys, ["tev", str(tmp_path / "legacy_cut.pt")], str(tmp_path / "legacy_cut.pt"),
           "the file ends early (truncated?)")
    (tmp_path / "notes.pt").write_text("hello\n")  # a text file: torch.load's own error is a bare KeyError(101)
    line = _fails(capsys, ["tev", str(tmp_path / "notes.pt")], str(tmp_path / "notes.pt"),
                  "it is not a checkpoint torch wrote")
    assert "weights_only=True): 101" not in line
    (tmp_path / "folder.pt").mkdir()
    _fails(capsys, ["tev", str(tmp_path / "folder.pt")], str(tmp_path / "folder.pt"), "is a folder without")
    if os.path.exists(os.devnull) and not os.path.isfile(os.devnull):
        _fails(capsys, ["tev", os.devnull], os.devnull, "is not a regular file")
        _fails(capsys, ["plot", os.devnull], os.devnull, "is not a regular file")


# ---------------------------------------------------------------- mlra plot


def _log(path, *records, meta=True):
    lines = ([json.dumps({"meta": {"name": "run"}})] if meta else []) + [
        r if isinstance(r, str) else json.dumps(r) for r in records
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = {"step": 0, "tev_mean": 0.5, "tev_std": 0.1, "loss": 3.0}


def test_plot_rejects_logs_it_cannot_draw(tmp_path, capsys):
    out = tmp_path / "p.png"
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01\x02\xff\xfe binary\n" * 20)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cases = [
        ("bin.jsonl", ["is binary data"]),
        ("empty.jsonl", ["is empty"]),
        (_log(tmp_path / "str_step.jsonl", GOOD, dict(GOOD, step="a")), [":3:", "'step' is \"a\"", "expected a number"]),
        (_log(tmp_path / "null_step.jsonl", dict(GOOD, step=None)), [":2:", "'step' is null"]),
        (_log(tmp_path / "bool_step.jsonl", dict(GOOD, step=True)), [":2:", "'step' is true"]),
        (_log(tmp_path / "str_value.jsonl", GOOD, "", dict(GOOD, step=1, tev_mean="x")), [":4:", "'tev_mean' is \"x\""]),
        (_log(tmp_path / "no_fields.jsonl", {"step": 0}, {"step": 1}), ["no record has 'loss', 'tev_mean', 'tev_std'"]),
        (_log(tmp_path / "meta_only.jsonl"), ["holds no records"]),
        (_log(tmp_path / "bad_meta.jsonl", '{"meta": 5}', GOOD, meta=False), ["not a TEVMonitor log"]),
    ]
    for name, parts in cases:
        path = str(tmp_path / name) if not os.path.isabs(name) else name
        _fails(capsys, ["plot", str(path), "-o", str(out)], path, *parts)
        assert not out.exists()
    # a bad log among good ones: nothing is drawn
    good = _log(tmp_path / "good.jsonl", GOOD, dict(GOOD, step=1))
    _fails(capsys, ["plot", good, str(tmp_path / "str_step.jsonl"), "-o", str(out)], "str_step.jsonl:3:")
    assert not out.exists()
    (tmp_path / "folder.jsonl").mkdir()
    _fails(capsys, ["plot", str(tmp_path / "folder.jsonl")], "folder.jsonl is a folder")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n.endswith(".png")]


def test_plot_out_paths(tmp_path, capsys):
    good = _log(tmp_path / "good.jsonl", GOOD, dict(GOOD, step=1))
    (tmp_path / "folder").mkdir()
    _fails(capsys, ["plot", good, "-o", str(tmp_path / "folder")], "--out", "is a folder")
    _fails(capsys, ["plot", good, "-o", str(tmp_path / "p.jpg2")], "--out", "cannot write a .jpg2 image")
    _fails(capsys, ["plot", good, "-o", str(tmp_path / "good.jsonl" / "p.png")], "--out", "is a file")
    _fails(capsys, ["plot", good, "-o", good], "--out", "cannot write a .jsonl image")
    # the default path next to a log named *.png would be the log itself
    log_png = _log(tmp_path / "log.png", GOOD)
    _fails(capsys, ["plot", log_png], "default plot path", "would overwrite it", "--out")
    assert json.loads(open(log_png).read().splitlines()[1]) == GOOD
    # no extension: .png is added, and the path printed is the one written
    assert main(["plot", good, "-o", str(tmp_path / "noext")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "noext.png")
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", good, "-o", str(tmp_path / "new" / "sub" / "p.png")]) == 0
    assert (tmp_path / "new" / "sub" / "p.png").exists()


def test_plot_failure_while_writing_keeps_the_old_image(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    good = _log(tmp_path / "good.jsonl", GOOD, dict(GOOD, step=1))
    out = tmp_path / "p.png"
    out.write_bytes(b"the previous plot")

    def fail(self, fname, **kw):
        fname.write(b"half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    _fails(capsys, ["plot", good, "-o", str(out)], f"cannot write {out}", "No space left on device")
    assert out.read_bytes() == b"the previous plot"
    assert sorted(os.listdir(tmp_path)) == ["good.jsonl", "p.png"]


# ---------------------------------------------------------------- mlra bench, mlra itself


def test_bench_child_killed_by_a_signal_is_a_failure(capsys, monkeypatch):
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: -9)
    assert main(["bench", "tev"]) == 137
    assert "killed by signal 9" in capsys.readouterr().err
    codes = iter([3, 0, 0])  # tev, mlra, decode
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: next(codes))
    assert main(["bench"]) == 3


def test_unforeseen_errors_are_one_line_and_traceback_on_request(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", boom)
    _fails(capsys, ["info"], "mlra info: error: RuntimeError: first line second line", "--traceback")
    with pytest.raises(RuntimeError, match="first line"):
        main(["--traceback", "info"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    _fails(capsys, ["info"], "mlra info: interrupted", rc=130)


def test_warnings_are_one_line(capsys, monkeypatch):
    def warn(args):
        warnings.warn("a.jsonl:3: something\nover two lines", RuntimeWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_info", warn)
    # pytest records warnings; show them on stderr as Python does outside pytest
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        os.sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["info"]) == 0
    assert capsys.readouterr().err == "mlra info: warning: a.jsonl:3: something over two lines\n"


def test_tev_on_a_monitor_log_says_what_it_is_and_how_to_plot_it(tmp_path, capsys):
    from mlra_kernels import TEVMonitor

    log = tmp_path / "run.jsonl"
    with TEVMonitor(torch.nn.Embedding(10, 4), every=1, path=log, name="a") as mon:
        mon.step(0, loss=1.0)
    _fails(capsys, ["tev", str(log)], str(log), "is a TEV monitor log", f"mlra plot {log}")
    header_only = tmp_path / "header.jsonl"  # a run stopped before its first record
    header_only.write_text(log.read_text().splitlines()[0] + "\n")
    _fails(capsys, ["tev", str(header_only)], "is a TEV monitor log")
    other = tmp_path / "other.jsonl"  # JSON lines, but not a monitor log: the loader's own message
    other.write_text('{"a": 1}\n')
    _fails(capsys, ["tev", str(other)], str(other), "as a PyTorch state dict")
