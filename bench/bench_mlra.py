"""Benchmark of the fused MLRA attention (the code is in mlra_kernels/benchmarks/mlra.py; --help for options).

    python bench/bench_mlra.py [--models small --T 2048 --dtypes bf16]
    TRITON_INTERPRET=1 python bench/bench_mlra.py --smoke     # tiny shapes on CPU under the interpreter
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mlra_kernels.benchmarks.common import script_default_out  # noqa: E402
from mlra_kernels.benchmarks.mlra import main  # noqa: E402

if __name__ == "__main__":
    # From the checkout root (as the README runs it) the default folder is bench/results, the committed
    # results, which the run replaces; from any other folder, ./bench/results there (see --help).
    sys.exit(main(prog="bench_mlra.py", default_out=script_default_out(__file__)))
