"""docs/scaling.md holds what bench/comm_table.py computes; the collectives of one training step, counted live
by torch's CommDebugMode on 2 CPU processes, equal the script's model of them; and so does the committed
record of that run, which the page shows."""

import importlib.util
import json
import os

import pytest
import torch.distributed as dist

from tests.helpers import REPO


def _comm_table():
    spec = importlib.util.spec_from_file_location("comm_table", REPO / "bench" / "comm_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_page_is_generated_from_the_script():
    ct = _comm_table()
    page = (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
    for name, (begin, end) in ct.BLOCKS.items():
        assert page.count(begin) == 1 and page.count(end) == 1, name
        block = page[page.index(begin) + len(begin):page.index(end)].strip("\n")
        assert block == ct.render(name), "run: python bench/comm_table.py --page docs/scaling.md"


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
def test_measured_collectives_equal_the_model():
    # Imported as a module of the source tree, so that the spawned processes can import its worker.
    from bench import comm_table as ct

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res = ct.measure()
    assert {tuple(k.split()) for k in res["cases"]} == {(s, a, f"g={g}") for s, a, g in ct.CASES}
    assert {s for s, _, _ in ct.CASES} == {"tp", "fsdp", "ddp"} and {g for s, _, g in ct.CASES if s == "tp"} == {1, 2}
    for key, row in res["cases"].items():
        scheme, attention, g = key.split()
        assert row["measured"]["counts"], key
        assert row["model"] == ct.predicted(scheme, attention, int(g[2:]), res["world"]), key
        assert row["measured"] == row["model"], key


def test_committed_record_equals_the_model():
    ct = _comm_table()
    res = json.loads(ct.RESULT.read_text())
    assert {tuple(k.split()) for k in res["cases"]} == {(s, a, f"g={g}") for s, a, g in ct.CASES}
    for key, row in res["cases"].items():
        assert row["measured"]["counts"], key
        assert row["measured"] == row["model"], key
        scheme, attention, g = key.split()
        assert row["model"] == ct.predicted(scheme, attention, int(g[2:]), res["world"]), key
