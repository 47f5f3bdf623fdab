"""TEVMonitor under faults: existing logs, two writers, a full disk, a killed process. Nothing acknowledged is lost."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from mlra_kernels import TEVMonitor
from mlra_kernels import monitor as monitor_module
from mlra_kernels.monitor import read_jsonl

POSIX_LOCKS = pytest.mark.skipif(monitor_module.fcntl is None, reason="no fcntl: logs are not locked on this OS")


def _emb(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Embedding.from_pretrained(torch.randn(40, 8, generator=g), freeze=False)


def _run(emb, path, steps, **kw):
    with TEVMonitor(emb, every=1, path=path, **kw) as mon:
        for step in steps:
            mon.step(step, loss=float(step))
    return mon


def _strict_lines(path):
    """Every line of the file, parsed; fails on any torn or non-JSON line."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the log ends in a partial line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def test_existing_log_is_refused_by_default_and_left_untouched(tmp_path):
    log = tmp_path / "run.jsonl"
    _run(_emb(), log, range(3))
    before = log.read_bytes()
    with pytest.raises(FileExistsError, match=r"run\.jsonl already holds a log.*mode='a'.*mode='w'") as info:
        TEVMonitor(_emb(), every=1, path=log)
    assert info.value.filename == str(log)
    assert log.read_bytes() == before


def test_empty_file_is_not_a_log(tmp_path):
    log = tmp_path / "touched.jsonl"
    log.write_bytes(b"")
    _run(_emb(), log, range(2))
    assert [r["step"] for r in read_jsonl(log)[1]] == [0, 1]


def test_append_continues_the_log_and_read_jsonl_reads_both_runs(tmp_path):
    log = tmp_path / "run.jsonl"
    emb = _emb()
    _run(emb, log, range(0, 4), name="first")
    first = log.read_bytes()
    _run(emb, log, range(4, 7), name="resumed", mode="a")
    assert log.read_bytes().startswith(first)  # the earlier records are kept byte for byte
    lines = _strict_lines(log)
    assert ["meta" in obj for obj in lines] == [True] + [False] * 4 + [True] + [False] * 3
    meta, records = read_jsonl(log)
    assert [r["step"] for r in records] == list(range(7))
    assert meta["name"] == "resumed" and meta["vocab_size"] == 40
    mean = torch.std(emb.weight.detach().double(), dim=1, unbiased=False).mean().item()
    assert all(r["tev_mean"] == pytest.approx(mean, rel=1e-6) for r in records)


def test_append_to_a_new_path_creates_it(tmp_path):
    log = tmp_path / "new" / "run.jsonl"
    _run(_emb(), log, range(2), mode="a")
    assert [r["step"] for r in read_jsonl(log)[1]] == [0, 1]


def test_overwrite_replaces_the_log(tmp_path):
    log = tmp_path / "run.jsonl"
    _run(_emb(), log, range(5))
    _run(_emb(), log, range(2), mode="w", name="again")
    meta, records = read_jsonl(log)
    assert meta["name"] == "again" and [r["step"] for r in records] == [0, 1]
    assert sum("meta" in obj for obj in _strict_lines(log)) == 1


def test_append_cuts_a_torn_last_line_first(tmp_path):
    log = tmp_path / "run.jsonl"
    _run(_emb(), log, range(3))
    with open(log, "ab") as f:
        f.write(b'{"step": 3, "tev_mea')  # a record cut short by a crash
    with pytest.warns(RuntimeWarning, match="ends in a partial line"):
        mon = TEVMonitor(_emb(), every=1, path=log, mode="a")
    mon.step(3)
    mon.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, records = read_jsonl(log)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    _strict_lines(log)


@POSIX_LOCKS
def test_a_second_monitor_on_the_same_log_is_refused_until_the_first_closes(tmp_path):
    log = tmp_path / "run.jsonl"
    first = TEVMonitor(_emb(), every=1, path=log)
    first.step(0)
    for mode in ("x", "a", "w"):
        with pytest.raises(RuntimeError, match=r"run\.jsonl is open in another TEVMonitor"):
            TEVMonitor(_emb(), every=1, path=log, mode=mode)
    first.step(1)
    first.close()
    _run(_emb(), log, [2], mode="a")
    assert [r["step"] for r in read_jsonl(log)[1]] == [0, 1, 2]


def test_without_fcntl_the_log_is_written_unlocked(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor_module, "fcntl", None)
    log = tmp_path / "run.jsonl"
    a = TEVMonitor(_emb(), every=1, path=log)
    b = TEVMonitor(_emb(), every=1, path=tmp_path / "other.jsonl")
    a.step(0)
    b.step(0)
    a.close()
    b.close()
    assert [r["step"] for r in read_jsonl(log)[1]] == [0]


class _FullDisk:
    """Stands in for the ``os`` module inside monitor.py: the n-th write is cut short, later ones fail."""

    def __init__(self, ok_writes, err=errno.ENOSPC):
        self.ok, self.err, self.calls = ok_writes, err, 0

    def write(self, fd, data):
        self.calls += 1
        if self.calls <= self.ok:
            return os.write(fd, data)
        if self.calls == self.ok + 1:
            return os.write(fd, data[: len(data) // 2])  # a short write, as at the edge of a full disk
        raise OSError(self.err, os.strerror(self.err))

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO], ids=lambda e: errno.errorcode[e])
def test_a_full_disk_warns_once_and_training_goes_on(err, tmp_path, monkeypatch):
    log = tmp_path / "run.jsonl"
    fake = _FullDisk(ok_writes=4, err=err)  # the header and 3 records fit
    monkeypatch.setattr(monitor_module, "os", fake)
    mon = TEVMonitor(_emb(), every=1, path=log, name="full")
    with pytest.warns(RuntimeWarning) as caught:
        recs = [mon.step(step, loss=1.0) for step in range(10)]
    mine = [w for w in caught if "TEVMonitor" in str(w.message)]
    assert len(mine) == 1
    msg = str(mine[0].message)
    assert str(log) in msg and os.strerror(err) in msg and "training continues" in msg
    assert all(r is not None for r in recs) and [r["step"] for r in mon.records] == list(range(10))
    assert mon.write_error is not None and mon.write_error.errno == err
    writes = fake.calls
    mon.step(10)
    mon.close()
    assert fake.calls == writes  # no further attempt once logging stopped
    lines = _strict_lines(log)  # cut back to the last complete line: no torn record
    assert [obj.get("step") for obj in lines] == [None, 0, 1, 2]


def test_read_jsonl_skips_a_torn_last_line_with_a_warning(tmp_path):
    log = tmp_path / "run.jsonl"
    _run(_emb(), log, range(3))
    with open(log, "ab") as f:
        f.write(b'{"step": 3, "tev_mean": 0.9\n\n')
    with pytest.warns(RuntimeWarning, match=r"run\.jsonl:5: the last line is not complete JSON"):
        _, records = read_jsonl(log)
    assert [r["step"] for r in records] == [0, 1, 2]
    torn = tmp_path / "torn_utf8.jsonl"  # cut inside a multi-byte character
    torn.write_bytes(b'{"meta": {}}\n{"step": 0}\n' + '{"step": 1, "note": "\u00e9"}'.encode("utf-8")[:-3])
    with pytest.warns(RuntimeWarning, match=r"torn_utf8\.jsonl:3: the last line is not complete JSON"):
        assert [r["step"] for r in read_jsonl(torn)[1]] == [0]


def test_read_jsonl_refuses_a_torn_line_in_the_middle(tmp_path):
    log = tmp_path / "run.jsonl"
    _run(_emb(), log, range(2))
    lines = log.read_text().splitlines()
    lines.insert(2, '{"step": 9, "tev_')
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"run\.jsonl:3: not a JSON line"):
        read_jsonl(log)
    log.write_text('{"meta": {}}\n[1, 2]\n{"step": 0}\n')
    with pytest.raises(ValueError, match=r"run\.jsonl:2: not a JSON object"):
        read_jsonl(log)


def test_extra_values_json_cannot_write_do_not_stop_training(tmp_path):
    import numpy as np

    log = tmp_path / "run.jsonl"
    with TEVMonitor(_emb(), every=1, path=log) as mon:
        mon.step(0, lr=np.float32(0.5), sizes=np.arange(3), obj=object())
    rec = read_jsonl(log)[1][0]
    assert rec["lr"] == 0.5 and rec["sizes"] == [0, 1, 2] and rec["obj"].startswith("<object")


# A training loop in a child process: prints "ack <step>" once monitor.step(step) has returned.
_TRAIN = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from mlra_kernels import TEVMonitor

    path, steps, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 4, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 64, (32, 4))
    y = torch.randint(0, 64, (32,))
    if fsize:
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that writes past the limit raise EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TEVMonitor(model, every=1, path=path, name="child") as mon:
            for step in range(steps):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                mon.step(step, loss=loss)
                print("ack", step, flush=True)
    print(json.dumps({
        "steps_done": step + 1,
        "records": [r["step"] for r in mon.records],
        "warnings": [str(w.message) for w in caught if "TEVMonitor" in str(w.message)],
        "errno": mon.write_error.errno if mon.write_error else None,
    }), flush=True)
    """
)


def _child(tmp_path, log, steps, fsize=0):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, str(script), str(log), str(steps), str(fsize)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ (POSIX)")
def test_file_size_limit_in_a_real_training_loop(tmp_path):
    log = tmp_path / "run.jsonl"
    limit = 1500  # the header and a few records: the next write crosses the limit and fails with EFBIG
    proc = _child(tmp_path, log, steps=40, fsize=limit)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["steps_done"] == 40 and res["records"] == list(range(40))  # training went on, all records kept
    assert res["errno"] == errno.EFBIG
    assert len(res["warnings"]) == 1 and str(log) in res["warnings"][0] and "training continues" in res["warnings"][0]
    assert 0 < log.stat().st_size <= limit
    lines = _strict_lines(log)  # valid JSONL: every line parses, none torn
    steps = [obj["step"] for obj in lines[1:]]
    assert "meta" in lines[0] and steps == list(range(len(steps))) and 0 < len(steps) < 40


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_kill_9_keeps_every_acknowledged_record_and_no_torn_line(tmp_path):
    log = tmp_path / "run.jsonl"
    proc = _child(tmp_path, log, steps=100_000)
    acked = []
    for line in proc.stdout:
        if line.startswith("ack "):
            acked.append(int(line.split()[1]))
        if len(acked) == 25:
            break
    proc.send_signal(signal.SIGKILL)  # mid-training, at whatever point the child is
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn last line either
        _, records = read_jsonl(log)
    on_disk = [r["step"] for r in records]
    assert on_disk[: len(acked)] == acked == list(range(25))
    _strict_lines(log)
    # The killed process held the lock; the OS released it, so the run can be resumed.
    _run(_emb(), log, [on_disk[-1] + 1], mode="a")
    assert [r["step"] for r in read_jsonl(log)[1]] == on_disk + [on_disk[-1] + 1]


def test_import_without_fcntl(tmp_path):
    """Windows has no fcntl: the monitor imports and logs, without a lock."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["fcntl"] = None  # import fcntl now raises ImportError
        from mlra_kernels import monitor
        assert monitor.fcntl is None
        import torch
        with monitor.TEVMonitor(torch.nn.Embedding(10, 4), every=1, path={str(tmp_path / 'w.jsonl')!r}) as m:
            m.step(0)
        print(len(monitor.read_jsonl({str(tmp_path / 'w.jsonl')!r})[1]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def _strict_json(line):
    """json.loads that refuses NaN and Infinity, which are not JSON (RFC 8259)."""
    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_odd_extra_values_are_recorded_or_left_out_with_one_warning(tmp_path):
    import numpy as np

    log = tmp_path / "run.jsonl"
    odd = dict(vec=torch.ones(3), half=torch.tensor(2.5, dtype=torch.bfloat16), count=torch.tensor(7),
               flag=torch.tensor(True), one=torch.full((1,), 0.25), arr=np.array([[1.0, np.inf]]),
               ratio=float("inf"), nested={"a": [float("nan"), 1], (1, 2): torch.tensor(3.0)}, obj=object(),
               big=torch.zeros(100_001), biglist=[0.5] * 20_000, tev_mean=5.0, meta={"name": "x"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TEVMonitor(_emb(), every=1, path=log) as mon:
            for step in range(3):
                rec = mon.step(step, loss=float("nan") if step == 0 else torch.ones(2), **odd)
                assert rec["step"] == step  # never an exception: training goes on
    assert rec["vec"] == [1.0, 1.0, 1.0] and rec["half"] == 2.5 and rec["one"] == 0.25
    assert rec["count"] == 7 and type(rec["count"]) is int and rec["flag"] is True
    assert rec["arr"] == [[1.0, float("inf")]] and rec["obj"].startswith("<object")
    assert "big" not in rec and "biglist" not in rec and "meta" not in rec and rec["tev_mean"] != 5.0
    assert "loss" not in rec  # a loss that is not one number is left out
    messages = [str(w.message) for w in caught if "TEVMonitor" in str(w.message)]
    assert len(messages) == 5, messages  # one per left-out value, not one per step
    for part in ("'big'", "'biglist'", "'tev_mean'", "'meta'", "loss"):
        assert sum(part in m for m in messages) == 1, (part, messages)
    lines = [_strict_json(line) for line in log.read_text().splitlines()]  # valid JSON: NaN/inf are null
    first = lines[1]
    assert first["loss"] is None and first["ratio"] is None and first["arr"] == [[1.0, None]]
    assert first["nested"] == {"a": [None, 1], "(1, 2)": 3.0}
    meta, records = read_jsonl(log)
    assert meta["name"] is None and [r["step"] for r in records] == [0, 1, 2]


def test_a_large_record_cut_mid_line_is_skipped_by_every_reader(tmp_path, capsys):
    """What a kill during the write of a large record leaves: read_jsonl, `mlra plot` and mode="a" cope."""
    pytest.importorskip("matplotlib", reason="mlra plot needs matplotlib")
    from mlra_kernels.cli import main

    log = tmp_path / "run.jsonl"
    with TEVMonitor(_emb(), every=1, path=log, name="cut") as mon:
        for step in range(4):
            mon.step(step, loss=1.0 / (step + 1), hist=torch.rand(5000))  # ~100 kB a line
    data = log.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    log.write_bytes(data[: last + (len(data) - last) // 2])  # the last record stops halfway
    with pytest.warns(RuntimeWarning, match=r"run\.jsonl:5: the last line is not complete JSON"):
        assert [r["step"] for r in read_jsonl(log)[1]] == [0, 1, 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["plot", str(log), "-o", str(tmp_path / "cut.png")]) == 0
    assert any("the last line is not complete JSON" in str(w.message) for w in caught)
    assert (tmp_path / "cut.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.warns(RuntimeWarning, match="ends in a partial line"):
        _run(_emb(), log, [3], mode="a")
    assert [obj.get("step") for obj in _strict_lines(log)] == [None, 0, 1, 2, None, 3]
