"""Peak memory of this process and all its descendants (the local Ray's raylet, GCS, workers)."""

from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """Context manager sampling in a background thread.

    peak_rss sums the processes' RSS every `every_s` (cheap: /proc/<pid>/statm); shared
    object-store pages count once per process that maps them, so it overstates. peak_pss sums
    their proportional set sizes (shared pages split between processes), read every `pss_every_s`
    only: it walks /proc/<pid>/smaps, whose kernel time on a 2-core machine would otherwise slow
    the very job being measured."""

    def __init__(self, every_s: float = 0.5, pss_every_s: float = 5.0):
        self.every_s, self.pss_every = every_s, max(1, round(pss_every_s / every_s))
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self._stop.is_set():
            with_pss = tick % self.pss_every == 0
            rss = pss = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    if with_pss:
                        info = proc.memory_full_info()
                        pss += getattr(info, "pss", info.rss)
                    else:
                        info = proc.memory_info()
                except psutil.Error:
                    continue
                rss += info.rss
            self.peak_rss = max(self.peak_rss, rss)
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
