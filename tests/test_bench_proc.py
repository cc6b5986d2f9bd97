"""benchmarks/_proc.py: the CPU time that bench_loader's "CPU us/cell" column divides by."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _proc import tree_cpu_s  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc only")

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_tree_cpu_counts_live_and_reaped_descendants_not_a_sleeping_parent():
    # a child spins 0.6 s of CPU next to a grandchild it starts, which spins 0.6 s more; the parent
    # only sleeps. Mid-way both are alive (their time is read from their own /proc entries); at the
    # end the grandchild has been reaped by the child and the child by us (their time is read from
    # the reapers' cutime/cstime): either way the window's CPU is the descendants', not wall time
    grandchild = SPIN.format(s=0.6)
    child = (f"import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
             + SPIN.format(s=0.6) + "p.wait()\n")
    before = tree_cpu_s()
    proc = subprocess.Popen([sys.executable, "-c", child])
    time.sleep(0.4)
    mid = tree_cpu_s()
    assert proc.poll() is None
    proc.wait()
    after = tree_cpu_s()
    assert 0.05 < mid - before < 1.0
    assert 1.15 <= after - before <= 2.0  # 2 x 0.6 s spinning (process_time: at least that) + start-up
