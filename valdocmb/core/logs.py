"""Logging with wall-clock stamps; results go to files, never to the log.

The research tools log everything to stderr. The container (`setup_logging(progress_to_stdout=True)`) logs as
grand-challenge reads it: progress to stdout, warnings and errors to stderr, because the platform tags every stderr
line as a warning and shows a failed job's last stderr line as its error.
"""

import logging
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def setup_logging(verbose: bool = False, progress_to_stdout: bool = False) -> None:
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(formatter)
    handlers = [errors]
    if progress_to_stdout:
        errors.setLevel(logging.WARNING)
        progress = logging.StreamHandler(sys.stdout)
        progress.setFormatter(formatter)
        progress.addFilter(_BelowWarning())
        handlers.append(progress)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True)


@contextmanager
def timed(timings: dict, stage: str, logger: logging.Logger | None = None):
    """Record the seconds spent in a `with` block under `timings[stage]` and log them."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        if logger is not None:
            logger.info("  %-16s %7.2f s", stage, timings[stage])


def peak_memory_mb() -> int:
    """This process's peak resident memory in MB. Linux carries ru_maxrss over from the parent's memory across the
    fork and exec that start a process (a 10 MB child of a 1.5 GB parent reports 1.5 GB); VmHWM belongs to this
    process's own memory map."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
