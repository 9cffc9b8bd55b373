"""What the benchmarks that chain the product's commands share: running commands side by side with their logs,
simulating sets, scoring sets with shared-out `valdocmb-stagewise` processes, and naming the hardware."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..train.samples import find_training_cases

log = logging.getLogger("valdocmb.bench")


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def run_logged(command: list[str], log_file: Path) -> int:
    """Run one command to its end, its output appended to `log_file` (a log written as it runs); its exit code."""
    with open(log_file, "a") as output:
        return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode


def append_line(log_file: Path, line: str) -> None:
    """One line added to a progress log."""
    with open(log_file, "a") as handle:
        handle.write(line + "\n")


def run_all(commands: dict[str, list[str]], logs: Path, at_once: int) -> None:
    """Run the named commands, `at_once` at a time, each logging to logs/<name>.log; stop on the first failure."""
    waiting = list(commands.items())
    running: dict = {}
    while waiting or running:
        while waiting and len(running) < at_once:
            name, command = waiting.pop(0)
            log.info("start %s: %s", name, " ".join(command))
            with open(logs / f"{name}.log", "w") as output:  # the child keeps its own copy of the file
                running[name] = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        time.sleep(1)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode:
                    for other in running.values():
                        other.kill()
                    raise SystemExit(f"{name} failed (exit {process.returncode}): see {logs / name}.log")
                log.info("done %s", name)


def run_beside(main: dict[str, list[str]], side: dict[str, list[str]], logs: Path) -> float:
    """Run `main` one at a time while every `side` command runs alongside; seconds until `main` finished."""
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as both:
        beside = both.submit(run_all, side, logs, len(side))
        run_all(main, logs, 1)
        main_seconds = time.perf_counter() - started
        beside.result()
    return main_seconds


def synthesis(sets: dict[str, list[str]], data: Path, jobs: int, *extra: str) -> dict[str, list[str]]:
    """`valdocmb-synth` commands for the sets (name: arguments with --cases) not made yet, `jobs` workers shared
    out in proportion to their cases."""
    cases = {name: int(a[a.index("--cases") + 1]) for name, a in sets.items()}
    total = sum(cases.values())
    return {f"synth-{name}": python("valdocmb.synth", "--out", str(data / name), *extra, "--workers",
                                    str(max(1, round(jobs * cases[name] / total))), *a)
            for name, a in sets.items() if not any((data / name).glob("sub-*_CMB.nii.gz"))}


def scoring(weights: Path, data: Path, cache: Path, device: str, processes: int, tag: str,
            extra: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """`valdocmb-stagewise` commands (with `extra` options) that share the scans of `data` between `processes`
    processes."""
    subjects = [subject for subject, _, _ in find_training_cases(data)]
    shares = [subjects[i::processes] for i in range(processes) if subjects[i::processes]]
    return {f"{tag}-{i}": python("valdocmb.train.stagewise", "--data", str(data), "--weights", str(weights),
                                 "--device", device, "--cache", str(cache), *extra, "--subjects", *share)
            for i, share in enumerate(shares)}


def scoring_sets(weights: Path, names, data: Path, scores: Path, tag: str, device: str,
                 processes: int, extra: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """`scoring` of each set data/<name> into scores/<tag>-<name>."""
    commands = {}
    for name in names:
        commands.update(scoring(weights, data / name, scores / f"{tag}-{name}", device, processes, f"{tag}-{name}",
                                extra))
    return commands


def hardware() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs{gpu}"
