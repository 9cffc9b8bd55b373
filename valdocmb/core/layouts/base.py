"""What every input/output layout provides: the cases it finds, where their outputs go, and its run-wide records.

A layout is one class (one module in this package plus one line in the registry of `__init__.py`). Discovery reads
no voxel data (DICOM discovery reads headers); it decides which files make which case. Problems with single inputs
become `Case`s that carry an error, so one bad file never hides the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..imageio import LABELS_SUFFIX, PROBABILITY_SUFFIX, image_extension


@dataclass
class Case:
    """One scan to process and where its mask goes.

    `input_path` is the scan file, or for a DICOM series its folder with the series' files in `series_files`.
    `input_names` are what results.json lists as its inputs; `details` holds what the layout knows of the scan
    (BIDS entities, the chosen echo, DICOM tags) for the outputs that describe it."""

    case_id: str
    input_path: Path | None
    output_path: Path | None
    input_names: list[str] = field(default_factory=list)
    error: str | None = None  # set when discovery already knows the case cannot run
    series_files: list[Path] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Discovery:
    """What discovery found: the layout, its cases (some already failed), and the entries it ignored, with why."""

    layout: Layout
    cases: list[Case]
    ignored: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class ReportFiles:
    """A case's optional reports (written when reports are on)."""

    table_csv: Path
    table_json: Path
    labels: Path
    picture: Path

    def all(self) -> list[Path]:
        return [self.table_csv, self.table_json, self.labels, self.picture]


@dataclass
class CaseOutcome:
    """What a run-wide record needs of one case: the case, its summary row, and its error (None when written)."""

    case: Case
    row: dict
    error: str | None


class Layout:
    """The base layout: masks and reports beside each other, no layout-specific outputs or run-wide records.

    `options` is the run's argparse namespace (output folder, socket names, location on/off, BIDS filters...)."""

    name: ClassVar[str] = ""
    reports_by_default: ClassVar[bool] = False  # `--reports auto` writes lesion tables, QC pictures, summary
    always_located: ClassVar[bool] = False      # its own outputs carry each CMB's region, reports on or off

    def __init__(self, options: Any):
        self.options = options
        self.output: Path = Path(options.output)

    @classmethod
    def detect(cls, input_dir: Path) -> bool:
        """Whether a folder looks like this layout (tried in the registry's order; the last one takes anything)."""
        return False

    def discover(self, input_dir: Path) -> Discovery:
        raise NotImplementedError

    def check_options(self) -> None:
        """Raise RunError for settings this layout cannot honour (before any case runs)."""

    def report_files(self, case: Case) -> ReportFiles:
        """Next to the mask: <mask>_lesions.csv/.json, <mask>_labels; QC pictures in qc/."""
        mask = case.output_path
        assert mask is not None
        return ReportFiles(sibling(mask, "_lesions", ".csv"), sibling(mask, "_lesions", ".json"),
                           sibling(mask, LABELS_SUFFIX), self.output / "qc" / f"{case.case_id}.png")

    def probability_file(self, case: Case) -> Path:
        assert case.output_path is not None
        return sibling(case.output_path, PROBABILITY_SUFFIX)

    def case_files(self, case: Case) -> list[Path]:
        """The files this layout writes for every successful case besides the mask (value sockets, sidecars)."""
        return []

    def write_case_files(self, case: Case, lesions: list, census: dict | None, info: dict) -> None:
        """Write `case_files`: `lesions` are report.Lesion rows, `census` the regional counts (None when not
        located), `info` the method's record (weights version, thresholds)."""

    def earlier_counts(self, case: Case) -> dict:
        """A case skipped by --resume: its count, volume and regions from what the earlier run wrote ({} if none)."""
        try:
            table = json.loads(self.report_files(case).table_json.read_text())
            return {"cmb_count": table["cmb_count"],
                    "total_volume_mm3": round(sum(lesion["volume_mm3"] for lesion in table["lesions"]), 3),
                    **table.get("regions", {})}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def write_records(self, outcomes: list[CaseOutcome], run_file) -> None:
        """Run-wide records of this layout (run_file(name) gives a record's path, with the shard in its name)."""


def sibling(mask_path: Path, suffix: str, ext: str | None = None) -> Path:
    """A file next to a mask: <mask stem><suffix><ext> (ext defaults to the mask's)."""
    mask_ext = image_extension(mask_path) or ""
    return mask_path.with_name(mask_path.name[: len(mask_path.name) - len(mask_ext)] + suffix + (ext or mask_ext))


def entries(input_dir: Path, found: Discovery) -> list[Path]:
    """The folder's entries in name order; hidden ones are ignored (and said so)."""
    listed = []
    for path in sorted(input_dir.iterdir()):
        if path.name.startswith("."):
            found.ignored.append((path, "hidden file"))
        else:
            listed.append(path)
    return listed
