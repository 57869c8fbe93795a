"""What every benchmark part shares: a command timed as the user waits, the host's load while it
ran, the peak memory of its whole process tree, spreads over repeats and a shuffled order.

A figure is only as good as the host it was taken on, so each timed command also records:
- `load_before`: the 1-minute load average when it started (it includes this benchmark's own
  previous command, so it is context, not the verdict);
- `others_cores`: the CPU the *rest* of the host used while it ran, in cores: the busy time of
  every CPU (/proc/stat) minus the CPU time of the command's own process tree, over the wall time.
  On a quiet host it is ~0; a part whose median run saw more than `LOADED_CORES` says so in its table.
"""

from __future__ import annotations

import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Other processes using a quarter of a core on average already move 2-core timings by ~10%.
LOADED_CORES = 0.25


def product_env(**extra: str) -> dict[str, str]:
    """The environment for a product command: this checkout's code first on the path (the shared
    virtualenv's editable install points at another checkout), nothing from the Hub."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
           "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)  # local ephemeral Prefect, a state folder per run
    # DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR (~/.cache by default). Checkouts
    # with other venv paths sharing that cache rebuild it in turn (tens of seconds on every launch);
    # a user's one venv builds it once (`make setup`). The bench keeps its own, built before timing.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".ftflow" / "bench-torch-extensions"))
    env.update(extra)
    return env


def build_deepspeed_ops() -> None:
    """Build DeepSpeed's CPU comm op once into the bench's extension folder (as `make setup` does)."""
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=product_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat), None without procfs."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_timed(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float | None = None, sample_s: float = 0.1) -> dict:
    """Run `cmd` to completion; wall seconds (start to exit, start-up included), its tree's CPU
    seconds, peak summed RSS of its tree (sampled every `sample_s`), the host's load, its output."""
    load_before = os.getloadavg()[0]
    busy0, cpu0 = _busy_seconds(), _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout} s; stderr tail:\n{err[-2000:]}") from None
    finally:
        done.set()
        sampler.join()
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    busy1 = _busy_seconds()
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / wall)
    result = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "peak_rss_mb": round(peak[0] / 2**20, 1),
              "load_before": round(load_before, 2), "others_cores": None if others is None else round(others, 3),
              "exit": proc.returncode, "stdout": out, "stderr": err}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}); stderr tail:\n{err[-3000:]}\n"
                           f"stdout tail:\n{out[-1000:]}")
    return result


def spread(values: list[float], digits: int = 3) -> dict:
    """Median with min and max (the figures every table shows)."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def fmt(s: dict, unit: str = "", digits: int = 2) -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def shuffled(methods: list[str], rng: random.Random) -> list[str]:
    """The methods in a fresh random order (one per repeat, so drift on the host biases none)."""
    order = list(methods)
    rng.shuffle(order)
    return order


def host() -> dict:
    import platform

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def load_verdict(runs: list[dict]) -> dict:
    """How loaded the host was over a part's timed runs, and whether its table must say so."""
    others = [r["others_cores"] for r in runs if r.get("others_cores") is not None]
    loads = [r["load_before"] for r in runs]
    verdict = {"others_cores": spread(others) if others else None, "load_before": spread(loads, 2),
               "threshold_cores": LOADED_CORES}
    verdict["loaded"] = bool(others) and statistics.median(others) > LOADED_CORES
    return verdict


def load_line(v: dict) -> str:
    o = v["others_cores"]
    text = (f"host: other processes used {fmt(o, ' cores')} (median [min-max]) during the timed runs; "
            f"1-min load average {fmt(v['load_before'])} at their starts")
    if v["loaded"]:
        text += (f"\n*** LOADED HOST: other processes used more than {v['threshold_cores']} cores; these figures "
                 f"are not a quiet-host measurement. Re-take them on a quiet host. ***")
    return text


def python() -> str:
    return sys.executable
