"""Logging to stderr with wall-clock stamps; results go to files, never to the log."""

import logging
import sys
import time
from contextlib import contextmanager


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


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
