"""A library user's first steps: the README's "Use MABN in your own model" example, whole, in a new
process with a new (empty) inductor cache, with the library's default kernels, against the same
with the eager kernels forced (MABN_FUSED=0) and with the compiled ones forced (MABN_FUSED=1, what
the default was before compiling became opt-in). Rounds run the three cases in turn; the table gives
medians and the median of each round's ratio to the eager case.

    python scripts/bench_first_use.py --rounds 5 --out results/bench_first_use_cpu.md
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mabn.benchmark import markdown_table, paired_ratio, round_robin, setting
from mabn.studies.reporting import publish

ROOT = Path(__file__).resolve().parents[1]
CASES = {"library default": None, "MABN_FUSED=0 (eager)": "0", "MABN_FUSED=1 (compiled)": "1"}


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Use MABN in your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def cold_run(code: str, fused: str | None):
    """A ``round_robin`` case: one run of ``code`` in a new process with an empty inductor cache."""
    env = {key: value for key, value in os.environ.items() if key != "MABN_FUSED"}
    if fused is not None:
        env["MABN_FUSED"] = fused

    def case(_round):
        with tempfile.TemporaryDirectory() as cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
            subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=ROOT)

    return case


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    code = readme_example()
    times = round_robin({case: cold_run(code, fused) for case, fused in CASES.items()}, args.rounds, warmup=0)
    eager = times["MABN_FUSED=0 (eager)"]
    lines = [
        "# A library user's first use: the README example from a cold inductor cache",
        "",
        f"`python scripts/bench_first_use.py --rounds {args.rounds}`: the README's library example (a ResNet-18 "
        "converted to MABN, 3 training steps of 32 images at 64 px, eval, fold), each run a new process with an "
        f"empty inductor cache, the cases in turn (round robin), {args.rounds} rounds; {setting('cpu')}. "
        "Ratio: the median over rounds of the round's time over the eager case's.",
        "",
        *markdown_table(
            ["kernels", "median s", "ratio to eager"],
            [[case, f"{statistics.median(v):.1f}", f"{paired_ratio(v, eager):.2f}"] for case, v in times.items()],
        ),
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
