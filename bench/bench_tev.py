"""Benchmark of mlra_kernels.tev (the code is in mlra_kernels/benchmarks/tev.py; --help for options).

    python bench/bench_tev.py [--device cuda] [--max-elems 1e8] [--rep 9]
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mlra_kernels.benchmarks.common import script_default_out  # noqa: E402
from mlra_kernels.benchmarks.tev import main  # noqa: E402

if __name__ == "__main__":
    # From the checkout root (as the README runs it) the default folder is bench/results, the committed
    # results, which the run replaces; from any other folder, ./bench/results there (see --help).
    sys.exit(main(prog="bench_tev.py", default_out=script_default_out(__file__)))
