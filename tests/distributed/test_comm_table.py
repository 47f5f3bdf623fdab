"""docs/scaling.md holds what bench/comm_table.py computes, and the committed CPU run's collectives (counted by
torch's CommDebugMode) equal the script's model of them."""

import importlib.util
import json

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


def test_measured_collectives_equal_the_model():
    ct = _comm_table()
    res = json.loads(ct.RESULT.read_text())
    assert {tuple(k.split()) for k in res["cases"]} == {(s, a, f"g={g}") for s, a, g in ct.CASES}
    for key, row in res["cases"].items():
        assert row["measured"]["counts"], key
        assert row["measured"] == row["model"], key
        scheme, attention, g = key.split()
        assert row["model"] == ct.predicted(scheme, attention, int(g[2:]), res["world"]), key
