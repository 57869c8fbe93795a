"""The bench's measuring helpers (bench/common.py): peak memory summed over a process tree, the
spread of repeats, the loaded-host verdict."""

from __future__ import annotations

import random
import sys

import pytest

from bench.common import LOADED_CORES, load_verdict, run_timed, shuffled, spread

HOLD = "import time; x = bytearray({mb} * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep({s})"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs")
def test_peak_rss_sums_the_whole_tree():
    # a parent holding 120 MB that starts a child holding 150 MB while it waits: the tree peaks at >= 270 MB
    child = HOLD.format(mb=150, s=1.5)
    parent = (f"import subprocess, sys; {HOLD.format(mb=120, s=0)}; "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    r = run_timed([sys.executable, "-c", parent], sample_s=0.05)
    assert r["exit"] == 0 and r["peak_rss_mb"] >= 270, r
    assert r["wall_s"] >= 1.5 and r["cpu_s"] > 0


def test_failure_names_the_command_and_its_error():
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 3\).*boom"):
        run_timed([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])


def test_spread_and_order():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    methods = ["a", "b", "c", "d"]
    orders = {tuple(shuffled(methods, random.Random(s))) for s in range(20)}
    assert len(orders) > 1 and all(sorted(o) == methods for o in orders)


def test_loaded_verdict_follows_the_median_of_other_processes_cpu():
    quiet = [{"others_cores": 0.02, "load_before": 0.3}, {"others_cores": 0.9, "load_before": 1.0},
             {"others_cores": 0.05, "load_before": 0.4}]
    assert load_verdict(quiet)["loaded"] is False  # one spike does not condemn the run
    busy = [{"others_cores": LOADED_CORES + 0.5, "load_before": 6.0}] * 3
    assert load_verdict(busy)["loaded"] is True
