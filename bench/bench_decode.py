"""Decode benchmark (the code is in mlra_kernels/benchmarks/decode.py; --help for options).

    python bench/bench_decode.py [--device cuda] [--batches 1,4,16] [--lengths 512,2048,8192]
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mlra_kernels.benchmarks.common import script_default_out  # noqa: E402
from mlra_kernels.benchmarks.decode import main  # noqa: E402

if __name__ == "__main__":
    # From the checkout root (as the README runs it) the default folder is bench/results, the committed
    # results, which the run replaces; from any other folder, ./bench/results there (see --help).
    sys.exit(main(prog="bench_decode.py", default_out=script_default_out(__file__)))
