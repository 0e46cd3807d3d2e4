"""What every benchmark here shares: CPU accounting of a process tree, other people's load, repeats, the JSON line.

These machines are shared and noisy, so a benchmark (1) compares ratios measured side by side in one run,
(2) reports the best of a few repeats (the least disturbed), (3) says how busy the machine was with other
work while it measured, and (4) prints its figures as one JSON line last (also written to $OUT/<name>.json
when $OUT is set, as on the GPU machine).

    from harness import ProcessTreeMeter, best_of, emit, machine_busy_share, wait_quiet
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ProcessTreeMeter:
    """Wall time, CPU seconds of this process tree (children included: Ray's raylet, GCS and workers, a server
    subprocess) and busy CPU seconds of the whole machine, so that other people's load during a run shows up
    as `foreign_cpu_share`; `cpu_wait_s` is how long the tree's threads were runnable but waiting for a CPU."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()

    def _tree(self):
        return [self.me, *self.me.children(recursive=True)]

    def _own(self) -> dict[int, float]:
        """CPU seconds by pid (a process that exits during the run takes its CPU time with it)."""
        out = {}
        for proc in self._tree():
            try:
                c = proc.cpu_times()
                out[proc.pid] = c.user + c.system
            except self.psutil.Error:
                pass
        return out

    def _run_delay(self) -> dict[tuple[int, str], float]:
        """Seconds each thread of the tree has spent runnable but waiting for a CPU (/proc schedstat)."""
        out = {}
        for proc in self._tree():
            for task in glob.glob(f"/proc/{proc.pid}/task/*/schedstat"):
                try:
                    with open(task) as f:
                        out[(proc.pid, task)] = int(f.read().split()[1]) / 1e9
                except (OSError, ValueError, IndexError):
                    pass
        return out

    def _machine(self) -> float:
        c = self.psutil.cpu_times()
        return sum(getattr(c, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

    def start(self) -> None:
        self.t0, self.own0, self.mach0 = time.perf_counter(), self._own(), self._machine()
        self.delay0 = self._run_delay()

    def stop(self, units: int, unit: str = "clip") -> dict[str, Any]:
        """Figures since `start()`; `cpu_ms_per_<unit>` divides the tree's CPU by `units`."""
        wall = time.perf_counter() - self.t0
        own_now = self._own()
        own = sum(cpu - self.own0.get(pid, 0.0) for pid, cpu in own_now.items())
        mach = self._machine() - self.mach0
        waited = sum(d - self.delay0.get(k, 0.0) for k, d in self._run_delay().items())
        cores = os.cpu_count() or 1
        return {"own_cpu_s": round(own, 2), f"cpu_ms_per_{unit}": round(own / max(units, 1) * 1e3, 1),
                "new_processes": len(set(own_now) - set(self.own0)),
                "cpu_wait_s": round(waited, 2),
                "foreign_cpu_share": round(max(mach - own, 0.0) / (max(wall, 1e-9) * cores), 2)}


def machine_busy_share(seconds: float = 2.0) -> float:
    """Share of all cores busy over `seconds` (the caller idles meanwhile)."""
    import psutil

    return round(psutil.cpu_percent(interval=seconds) / 100.0, 2)


def wait_quiet(limit_s: float, share: float) -> float:
    """Wait (up to `limit_s`) until other load is under `share` of the machine; returns the last reading."""
    deadline = time.perf_counter() + limit_s
    busy = machine_busy_share()
    while busy > share and time.perf_counter() < deadline:
        print(f"  machine {busy:.0%} busy with other work; waiting for it to calm down", flush=True)
        busy = machine_busy_share(5.0)
    return busy


def set_autogroup_nice(value: int) -> int | None:
    """Set this session's autogroup niceness (root: shields every measured way alike from other sessions);
    returns the previous value, None where unsupported."""
    path = Path("/proc/self/autogroup")
    try:
        previous = int(path.read_text().split()[-1])
        path.write_text(str(value))
        print(f"  session autogroup niceness {previous} -> {value}", flush=True)
        return previous
    except (OSError, ValueError, IndexError) as e:
        print(f"  could not set the autogroup niceness ({e}); measuring at normal priority", flush=True)
        return None


def best_of(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> tuple[float, Any]:
    """(fastest wall seconds of `repeats` calls, the last call's result); `sync` waits for a device."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def machine_note() -> dict[str, Any]:
    """How busy the machine was as the run ended: 1-minute load average and cores (for the JSON line)."""
    return {"load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def emit(name: str, figures: dict[str, Any]) -> None:
    """Print `figures` as the one JSON line that ends a benchmark's output (and write $OUT/<name>.json)."""
    line = json.dumps(figures, default=str)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(line + "\n")
    print(line, flush=True)
