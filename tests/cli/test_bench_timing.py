"""The benchmarks' timings and the clock's floor, on fake clocks (no test here depends on this machine's
speed): timings within a few ticks of the clock's resolution, or whose repeats all read the same quantum,
are taken again over batches of calls and divided, or refused; the result files say what was done."""

import json
import math
import random

import pytest

from mlra_kernels.benchmarks import common


class FakeClock:
    """A clock that reads the fake time rounded down to `quantum` seconds; each reading costs `read_cost`
    seconds of fake time, and the code under test spends fake time with :meth:`work`."""

    def __init__(self, quantum, read_cost=1e-6):
        self.quantum, self.read_cost, self.now = quantum, read_cost, 0.0

    def __call__(self):
        self.now += self.read_cost
        return math.floor(self.now / self.quantum) * self.quantum

    def work(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    """An 8 ms clock (the floor every row of a loaded machine once read)."""
    fake = FakeClock(8e-3)
    monkeypatch.setattr(common, "CLOCK", fake)
    return fake


def _jittered(clock, seconds, seed=0, spread=0.02):
    """A call that takes `seconds` of fake time, plus up to `spread` of it."""
    rng = random.Random(seed)
    return lambda: clock.work(seconds * (1 + spread * rng.random()))


# ---------------------------------------------------------------- the clock's resolution


def test_measured_tick_is_the_clocks_quantum(clock):
    info = common.clock_info()
    assert info["measured_tick_s"] == pytest.approx(8e-3)
    assert info["resolution_s"] == pytest.approx(8e-3)  # the larger of it and the reported 1 ns
    assert info["timer"] == "time.perf_counter" and info["floor_ticks"] == common.FLOOR_TICKS


def test_a_stalled_clock_is_refused(monkeypatch):
    monkeypatch.setattr(common, "CLOCK", lambda: 5.0)  # a new function: its tick is measured afresh
    with pytest.raises(common.BenchError, match="did not move in a million readings"):
        common.clock_resolution()


def test_the_real_clock_is_fine_grained():
    """Only that it moves and reports sensible numbers; its tick depends on the machine."""
    info = common.clock_info()
    assert 0 < info["measured_tick_s"] < 1e-2 and info["resolution_s"] >= info["reported_resolution_s"]


# ---------------------------------------------------------------- detection


TICK = 1e-6


@pytest.mark.parametrize("spans, needle", [
    ([0.0, 0.0, 8e-6], "read 0"),                                # the clock did not move across a call
    ([5e-6, 6e-6, 5e-6, 7e-6], "within 20 ticks"),               # a few ticks of the resolution
    ([19e-6], "within 20 ticks"),                                # one timing is enough for that
    ([8e-3, 8e-3, 8e-3, 8e-3, 8e-3], "5 of 5 timings read 8 ms"),  # identical on a fine clock: stalled
    ([9e-3, 8e-3, 8e-3, 8e-3, 8e-3], "4 of 5 timings read 8 ms"),  # but the first
    ([100e-6, 100.4e-6, 100e-6], "3 of 3 timings read"),         # the same to within half a tick
    ([8e-3, 16e-3, 8e-3, 8e-3, 24e-3], "whole multiple of 8 ms"),  # a scheduler or clock quantum
    ([8.01e-3, 16.02e-3, 8.03e-3, 7.99e-3, 15.97e-3], "scheduler time slice"),  # slices, with their jitter
])
def test_timings_on_the_floor_are_detected(spans, needle):
    reason = common.floor_reason(spans, TICK)
    assert reason is not None and needle in reason, reason


@pytest.mark.parametrize("spans", [
    [8.02e-3, 7.95e-3, 8.31e-3, 8.0e-3, 8.11e-3],  # a real workload's spread
    [21e-6, 25e-6, 22e-6],                          # 20 ticks and more
    [8e-3, 8e-3],                                   # two repeats say nothing about a quantum
    [9e-3, 7e-3, 8e-3, 8e-3, 8e-3],                 # three of five the same: not 80%
    [100e-6, 101e-6, 100e-6],                       # one tick apart: two readings of a coarse clock
    [8e-3, 16.4e-3, 8e-3],                          # not a whole multiple
    [1.2e-3, 2.5e-3, 1.3e-3],                       # a slow repeat, not a multiple to within 3%
    [0.4e-3, 0.81e-3, 0.4e-3],                      # under a millisecond: not a time slice
])
def test_real_timings_are_accepted(spans):
    assert common.floor_reason(spans, TICK) is None


def test_repeats_can_be_left_unchecked():
    """Batches of calls: a steady batch may read the same each time; only its length in ticks counts."""
    assert common.floor_reason([8e-3] * 5, TICK, repeats=False) is None
    assert common.floor_reason([5e-6] * 5, TICK, floor_ticks=4, repeats=False) is None
    assert common.floor_reason([3e-6] * 5, TICK, floor_ticks=4, repeats=False) is not None


# ---------------------------------------------------------------- handling: re-run with batches, or refuse


def test_time_cpu_batches_calls_on_a_coarse_clock(clock):
    """0.09 ms calls on an 8 ms clock: one call reads 0 or 8 ms; batches that span 200 ticks read right."""
    t = common.time_cpu(_jittered(clock, 0.09e-3), warmup=1, rep=5)
    assert t["rerun"] is True and t["inner"] >= common.TARGET_TICKS * 8e-3 / 0.0918e-3
    assert t["ms"] == pytest.approx(0.0909, rel=0.02) and t["n"] == 5
    assert t["ms_p20"] <= t["ms"] <= t["ms_p80"]


def test_time_cpu_keeps_single_calls_off_the_floor(clock):
    t = common.time_cpu(_jittered(clock, 0.5, spread=0.1), rep=5)  # 0.5 s calls: 62 to 69 ticks each
    assert (t["inner"], t["rerun"]) == (1, False)
    assert t["ms"] == pytest.approx(525, rel=0.05)


def test_a_steady_call_on_a_coarse_clock_is_batched(clock):
    """0.2 s calls, steady to 2%, on the 8 ms clock: most single calls read the same 25 ticks; batches of
    ten do not (and divide the quantisation by ten)."""
    t = common.time_cpu(_jittered(clock, 0.2), rep=5)
    assert (t["inner"], t["rerun"]) == (10, True)
    assert t["ms"] == pytest.approx(202, rel=0.01)


def test_time_cpu_min_time_counts_fake_time(monkeypatch):
    fine = FakeClock(1e-6)
    monkeypatch.setattr(common, "CLOCK", fine)
    t = common.time_cpu(_jittered(fine, 0.2), rep=2, min_time_s=1.0)
    assert t["n"] >= 5 and t["inner"] == 1


def test_identical_single_calls_are_taken_again_in_batches(monkeypatch):
    """On a fine clock every call reads one 8 ms scheduler quantum: identical repeats are not trusted, and
    the time of a batch, divided, is what the row gets (here each call does take a quantum)."""
    fine = FakeClock(1e-9)
    monkeypatch.setattr(common, "CLOCK", fine)
    quantum = 8e-3

    def sleep_bound():  # ends on the next quantum boundary
        fine.now = (math.floor(fine.now / quantum + 1e-6) + 1) * quantum

    t = common.time_cpu(sleep_bound, rep=5)
    assert t["rerun"] is True and t["inner"] == 10
    assert t["ms"] == pytest.approx(8.0, rel=1e-3)


def test_a_call_the_clock_never_sees_is_refused(clock):
    with pytest.raises(common.BenchError, match=r"^sum: timings on the clock's floor \(.*\) at \d+ call\(s\) per "
                                                r"timing, and \d+ calls per timing would pass the limit of 100000; "):
        common.time_cpu(lambda: None, rep=3, label="sum")


def test_a_rerun_that_would_take_too_long_is_refused(clock):
    """1 ms calls on an 8 ms clock, 3 000 timings asked for: batches of 200 would take minutes."""
    with pytest.raises(common.BenchError, match=r"^one-liner: timings on the clock's floor .* could take \d+ s"):
        common.time_cpu(_jittered(clock, 1e-3), rep=3000, label="one-liner")


def test_time_interleaved_reruns_only_the_candidates_on_the_floor(monkeypatch):
    clock = FakeClock(1e-4)  # 0.1 ms: the fast candidate's calls are half a tick
    monkeypatch.setattr(common, "CLOCK", clock)
    t = common.time_interleaved({"slow": _jittered(clock, 0.3, seed=1), "fast": _jittered(clock, 0.05e-3, seed=2)},
                                rounds=5)
    assert (t["slow"]["inner"], t["slow"]["rerun"]) == (1, False)
    assert t["fast"]["rerun"] is True and t["fast"]["inner"] >= common.TARGET_TICKS
    assert t["slow"]["ms"] == pytest.approx(303, rel=0.03) and t["fast"]["ms"] == pytest.approx(0.0505, rel=0.03)
    assert len(t["fast"]["times_ms"]) == 5 and t["fast"]["n"] == 5
    assert common.timing_fields(a=t["slow"], b=t["fast"]) == {"inner_reps": {"a": 1, "b": t["fast"]["inner"]},
                                                              "rerun_at_floor": True}


def test_time_gpu_batches_calls_within_a_few_event_ticks(monkeypatch):
    """do_bench faked: a 0.3 µs kernel reads one CUDA event tick; batched, it reads its time."""
    triton_testing = pytest.importorskip("triton.testing")
    calls = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        before = len(calls)
        fn()
        per_batch = (len(calls) - before) * 0.3e-3  # ms
        ms = max(0.5e-3, round(per_batch / 0.5e-3) * 0.5e-3)  # events resolve 0.5 µs
        return ms, ms, ms

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    t = common.time_gpu(lambda: calls.append(1), label="decode step")
    assert t["rerun"] is True and t["inner"] > 1
    assert t["ms"] == pytest.approx(0.3e-3, rel=0.02)

    calls.clear()
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep, quantiles: (0.05, 0.04, 0.06))
    assert common.time_gpu(lambda: None) == {"ms": 0.05, "ms_p20": 0.04, "ms_p80": 0.06, "n": None, "rep_ms": 100,
                                             "inner": 1, "rerun": False}


# ---------------------------------------------------------------- what the result file says


def test_results_record_the_clock_and_the_reruns(clock, tmp_path):
    rows = [{"op": "a", **common.timing_fields(x={"inner": 1, "rerun": False})},
            {"op": "b", **common.timing_fields(x={"inner": 1000, "rerun": True}, y={"inner": 1, "rerun": False})}]
    data = json.loads(common.write_results("r", rows, out_dir=tmp_path).read_text())
    assert data["meta"]["clock"]["resolution_s"] == pytest.approx(8e-3)
    assert data["meta"]["clock"]["reported_resolution_s"] > 0
    assert data["meta"]["rerun_at_floor"] is True and data["meta"]["rows_rerun_at_floor"] == 1
    assert data["rows"][1]["inner_reps"] == {"x": 1000, "y": 1} and data["rows"][0]["rerun_at_floor"] is False

    data = json.loads(common.write_results("r", rows[:1], out_dir=tmp_path).read_text())
    assert data["meta"]["rerun_at_floor"] is False and data["meta"]["rows_rerun_at_floor"] == 0


def test_tev_rows_say_how_each_time_was_taken():
    """bench_one's row on a tiny matrix, on the real clock: the fields, not the times."""
    from mlra_kernels.benchmarks import tev

    row = tev.bench_one(2000, 1024, "fp32", "cpu", rep=3)
    assert set(row["inner_reps"]) == {"tev", "one_liner", "sum"}
    assert all(isinstance(k, int) and k >= 1 for k in row["inner_reps"].values())
    assert row["rerun_at_floor"] is (max(row["inner_reps"].values()) > 1)


def test_a_loaded_machine_is_warned_about_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (5.5, 5.0, 4.0))
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    path = common.write_results("probe", [{"op": "x", "ms": 1.0}], out_dir=tmp_path)
    assert json.loads(path.read_text())["meta"]["loaded"] is True
    assert "load average was 5.50 on 2 CPUs" in capsys.readouterr().err
    monkeypatch.setattr(common.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    path = common.write_results("probe", [{"op": "x", "ms": 1.0}], out_dir=tmp_path)
    assert json.loads(path.read_text())["meta"]["loaded"] is False and "load average" not in capsys.readouterr().err
