"""The input/output layouts a user can hand the container (see the VALDO contract and docs/):

- `gc`: grand-challenge's sockets (`inputs.json`), the mask and value outputs where its sockets say.
- `bids`: a BIDS dataset (`dataset_description.json`), BIDS derivatives out, called as a BIDS App.
- `valdo2021`: the 2021 challenge's flat NIfTI names, masks to `images/`, `results.json`.
- `dicom`: a folder tree of DICOM files, one case per magnitude T2*-weighted or SWI series.
- `folder`: a plain folder of scans with any names; one mask per scan, named after it.

Adding a layout: a `Layout` subclass in a module of this package, and its class in `REGISTRY` below, in the place
where its detection should be tried (the first layout whose `detect` says yes is used; `folder` takes anything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RunError
from .base import Case, CaseOutcome, Discovery, Layout, ReportFiles, sibling
from .bids import Bids
from .dicom import Dicom
from .folder import FOLDER_MASK_SUFFIX, FOLDER_SCAN_EXTENSIONS, Folder
from .gc import GC_DEFAULT_OUTPUT_PATH, GrandChallenge
from .valdo import VALDO_LABEL, VALDO_T2S, Valdo2021, valdo_results_entry

REGISTRY: dict[str, type[Layout]] = {cls.name: cls for cls in (GrandChallenge, Bids, Valdo2021, Dicom, Folder)}

__all__ = ["Case", "CaseOutcome", "Discovery", "Layout", "ReportFiles", "sibling", "REGISTRY",
           "detect_layout", "discover", "GC_DEFAULT_OUTPUT_PATH", "FOLDER_MASK_SUFFIX", "FOLDER_SCAN_EXTENSIONS",
           "VALDO_LABEL", "VALDO_T2S", "valdo_results_entry"]


def detect_layout(input_dir: Path) -> str:
    return next(name for name, cls in REGISTRY.items() if cls.detect(Path(input_dir)))


def discover(options: Any) -> Discovery:
    """The layout in use and its cases, in a stable order, for a run's options (`input`, `output`, `layout` and
    the layout's own). Raises RunError only when no case can be listed.

    Every entry of the input folder ends up as a case (which may carry an error: a dangling link, a folder named
    like a scan) or in `ignored` with the reason: nothing is dropped without a word.
    """
    input_dir = Path(options.input)
    if not input_dir.exists():
        raise RunError(f"{input_dir}: input folder not found")
    if not input_dir.is_dir():
        raise RunError(f"{input_dir}: is a file, not an input folder")
    name = detect_layout(input_dir) if options.layout == "auto" else options.layout
    if name not in REGISTRY:
        raise RunError(f"unknown layout {name!r}; choose one of auto, {', '.join(REGISTRY)}")
    layout = REGISTRY[name](options)
    layout.check_options()
    return layout.discover(input_dir)
