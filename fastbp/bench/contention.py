"""A busy machine on purpose: other CPU-bound processes beside a benchmark (``--contended``).

The load is a Python busy loop per process, not pinned to any core (the OS places
it, as it would any other user's job), started before the timed work and stopped
after it. The record says how much CPU the load really took, so a reader can see
that it held a core the whole time.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
import sys
import time
from typing import Any

from . import machine

BUSY_LOOP = "while True: pass"


class BusyLoad:
    """``count`` busy-loop processes while the ``with`` block runs; ``record`` describes them after.

    ``pids`` are the load's process ids (to leave out of "other processes" meters).
    """

    def __init__(self, count: int = 1) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1. Received: count={count!r}")
        self.count = count
        self.pids: tuple[int, ...] = ()
        self.record: dict[str, Any] = {}
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "BusyLoad":
        self._procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                       for _ in range(self.count)]
        self.pids = tuple(p.pid for p in self._procs)
        # Until each loop has run a little, the interpreter is still starting: not yet a steady load.
        deadline = time.perf_counter() + 5.0
        while time.perf_counter() < deadline:
            used = [machine.process_cpu_seconds(pid) for pid in self.pids]
            if all(u is None or u >= 0.05 for u in used):
                break
            time.sleep(0.02)
        self._cpu0 = [machine.process_cpu_seconds(pid) for pid in self.pids]
        self._t0 = time.perf_counter()
        self.record = {"what": f"{self.count} busy-loop process(es): {sys.executable} -c {BUSY_LOOP!r}, "
                               "not pinned to a core", "pids": list(self.pids),
                       "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "load_average_start": machine.load_average()}
        return self

    def __exit__(self, *exc) -> bool:
        wall = time.perf_counter() - self._t0
        cpu1 = [machine.process_cpu_seconds(pid) for pid in self.pids]
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait()
        used = [None if a is None or b is None else b - a for a, b in zip(self._cpu0, cpu1)]
        self.record.update(wall_s=wall, cpu_seconds=used, load_average_end=machine.load_average(),
                           cores_held=[None if u is None else u / max(wall, 1e-9) for u in used])
        return False
