"""`bids`: a BIDS dataset in (`sub-*/[ses-*/]anat/`), BIDS derivatives out, as a BIDS App is called:
`process.py BIDS_DIR OUTPUT_DIR participant [--participant-label ...] [--session-label ...]`.

Taken as input: `T2starw`; multi-echo `MEGRE` (the magnitude echo nearest `--echo-time`, by each echo's sidecar
EchoTime); `swi` and `GRE` magnitude images of the SWI proposal (BEP004). Phase parts, quantitative `T2star` maps,
projections and every other suffix are listed as ignored with the reason.

Written, per scan, beside where BIDS puts derivatives of it (`sub-*/[ses-*/]anat/`, the source's entities without
its suffix, echo and part):
- `<entities>_desc-cmb_mask.nii.gz`, 1 = microbleed, in the scan's exact geometry, and its JSON sidecar (Sources,
  method, weights version, parameters, the echo used, the count, volume and regional counts);
- `<entities>_desc-cmb_lesions.tsv`, one row per microbleed, with `_desc-cmb_lesions.json`, its data dictionary;
- `<entities>_desc-cmb_regions.tsv`, the regional counts (unless `--location off`);
and for the run: `dataset_description.json` (DatasetType derivative, GeneratedBy), `cmb_scans.tsv` (one row per
scan with its counts: every scan whose sidecar is in the folder, so shards that share the folder add up; the
`group` level rebuilds it) with `cmb_scans.json`, and a `.bidsignore` for the files BIDS has no name for yet.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from ... import __version__
from ..dicom import DEFAULT_ECHO_TIME_MS, nearest_echo
from ..errors import RunError
from ..imageio import write_text_atomic
from ..location import CENSUS_FIELDS
from ..report import LESION_FIELDS
from .base import Case, CaseOutcome, Discovery, Layout, ReportFiles

SCAN_SUFFIXES = ("T2starw", "MEGRE", "swi", "GRE")
IGNORED_SUFFIXES = {"T2star": "a quantitative T2* map, not a T2*-weighted image",
                    "minIP": "a minimum-intensity projection, not a volume of the scan"}
NON_MAGNITUDE_PARTS = ("phase", "real", "imag")
SKIPPED_TOP_FOLDERS = ("derivatives", "sourcedata", "code", "stimuli", "phenotype")
DERIVED_DROPPED = ("echo", "part")  # a mask is of the scan, not of one echo or part of it
NIFTI = re.compile(r"^(?P<stem>sub-[A-Za-z0-9]+(?:_[a-zA-Z]+-[A-Za-z0-9+]+)*_(?P<suffix>[A-Za-z0-9]+))"
                   r"\.nii(?:\.gz)?$")
DESC = "cmb"
BIDS_VERSION = "1.10.0"
SCANS_TABLE = "cmb_scans.tsv"
SCAN_COLUMNS = ("participant_id", "session_id", "source", "mask", "status", "echo_time_ms", "cmb_count",
                "total_volume_mm3", *CENSUS_FIELDS)
# files BIDS has no name for (yet): our tables, the reports and the run-wide records (one wildcard a pattern: the
# validator's matcher misses names that two wildcards should match)
BIDSIGNORE = ("*_lesions.tsv", "*_lesions.json", "*_regions.tsv", "cmb_scans.tsv", "cmb_scans.json", "reports/",
              "qc/", "summary*.csv", "index*.html", "run*.json")
DERIVATIVES_README = """# Cerebral microbleed masks (valdocmb)

Per scan, in `sub-*/[ses-*/]anat/`: `*_desc-cmb_mask.nii.gz` (1 = cerebral microbleed, in the scan's own grid) with
its JSON sidecar (source, method, weights version, parameters, count, volume, regional counts),
`*_desc-cmb_lesions.tsv` (one row per microbleed; columns described in `*_desc-cmb_lesions.json`) and
`*_desc-cmb_regions.tsv` (counts per MARS class). `cmb_scans.tsv` lists every scan with its counts; `run*.json`
records versions, parameters and timings. Made by valdocmb from T2*-weighted or SWI magnitude images. The weights
were trained on simulated scans: read the measured figures in valdocmb's documentation before relying on them.
"""
LESION_COLUMNS = {
    "id": "Number of the microbleed in this scan (1, 2, ...), its value in the labelled mask when one is written",
    "voxel_x": "Centre of mass, voxel index along the image's first axis (0-based)",
    "voxel_y": "Centre of mass, voxel index along the image's second axis (0-based)",
    "voxel_z": "Centre of mass, voxel index along the image's third axis (0-based)",
    "world_x_mm": "Centre of mass in the scanner's physical space (ITK LPS convention), x", "world_y_mm": "... y",
    "world_z_mm": "... z", "volume_mm3": "Volume of the segmented microbleed", "volume_voxels": "Its voxel count",
    "max_probability": "Highest segmentation probability inside it", "mean_probability": "Mean of that probability",
    "screening_score": "Three-stage: score of the screening network at its candidate (empty for nnU-Net)",
    "discrimination_score": "Three-stage: score of the discrimination network (empty for nnU-Net)",
    "region": "Atlas region after registration to MNI space (empty when not located)",
    "mars_class": "MARS class: lobar, deep or infratentorial (unknown when the registration was refused)",
    "side": "left, right or midline",
}
UNITS = {"world_x_mm": "mm", "world_y_mm": "mm", "world_z_mm": "mm", "volume_mm3": "mm^3"}


def entities(stem: str) -> tuple[dict[str, str], str]:
    """A BIDS file stem's entities (in order) and suffix: sub-01_ses-1_T2starw -> ({sub: 01, ses: 1}, T2starw)."""
    *pairs, suffix = stem.split("_")
    return dict(pair.split("-", 1) for pair in pairs), suffix


def nifti_stem(path: Path) -> str:
    """The stem of a file discovery already matched as a BIDS NIfTI name."""
    match = NIFTI.match(path.name)
    assert match is not None, path
    return match["stem"]


def bids_name(pairs: dict[str, str]) -> str:
    return "_".join(f"{key}-{value}" for key, value in pairs.items())


def label_list(values: list[str] | None, prefix: str) -> list[str] | None:
    """Labels as a BIDS App takes them: with or without their prefix (`01` or `sub-01`)."""
    return None if not values else [value.removeprefix(f"{prefix}-") for value in values]


class Bids(Layout):
    name = "bids"
    always_located = True  # the sidecar and the scans table carry the regional counts

    @classmethod
    def detect(cls, input_dir: Path) -> bool:
        return (input_dir / "dataset_description.json").is_file()

    def check_options(self) -> None:
        input_dir, output = Path(self.options.input).resolve(), self.output.resolve()
        if output == input_dir:
            raise RunError(f"{self.output}: the derivatives cannot be written into the BIDS dataset's own top "
                           "folder; give e.g. BIDS_DIR/derivatives/valdocmb")

    def discover(self, input_dir: Path) -> Discovery:
        found = Discovery(self, [])
        participants = label_list(getattr(self.options, "participant_label", None), "sub")
        sessions = label_list(getattr(self.options, "session_label", None), "ses")
        target_ms = getattr(self.options, "echo_time", None) or DEFAULT_ECHO_TIME_MS
        seen_participants: set[str] = set()
        echoes: dict[tuple, list[tuple[float | None, Path, dict[str, str]]]] = {}
        scans: list[tuple[Path, dict[str, str], str]] = []
        for path in self._anat_files(input_dir):
            match = NIFTI.match(path.name)
            if not match:
                if not path.name.endswith((".json", ".tsv", ".bval", ".bvec")):
                    found.ignored.append((path, "not a BIDS NIfTI file name"))
                continue
            pairs, suffix = entities(match["stem"])
            if participants is not None and pairs["sub"] not in participants:
                continue
            if sessions is not None and pairs.get("ses") not in sessions:
                continue
            seen_participants.add(pairs["sub"])
            if suffix not in SCAN_SUFFIXES:
                found.ignored.append((path, IGNORED_SUFFIXES.get(suffix, f"suffix {suffix}: not T2*-weighted")))
            elif pairs.get("part", "mag") in NON_MAGNITUDE_PARTS:
                found.ignored.append((path, f"part-{pairs['part']}: not a magnitude image"))
            elif suffix == "MEGRE" or "echo" in pairs:
                key = (suffix, tuple((k, v) for k, v in pairs.items() if k not in DERIVED_DROPPED))
                echo_time = sidecar(path, input_dir).get("EchoTime")
                echoes.setdefault(key, []).append((None if echo_time is None else 1000 * float(echo_time), path,
                                                   pairs))
            else:
                scans.append((path, pairs, suffix))
        missing = sorted(set(participants or []) - seen_participants)
        if missing:
            raise RunError(f"{input_dir}: no scan of participant(s) {', '.join(missing)} (--participant-label)")
        problems: list[Case] = []
        chosen: dict[Path, float] = {}
        for (suffix, _), echo_list in sorted(echoes.items()):
            echo_list.sort(key=lambda item: str(item[1]))
            times = [echo_time for echo_time, _, _ in echo_list]
            if len(echo_list) == 1:
                echo_time, path, pairs = echo_list[0]
            elif None in times:
                first = echo_list[0][1]
                problems.append(Case(first.name.split(".")[0], first, None, [p.name for _, p, _ in echo_list],
                                     error=f"{first}: echoes of a {suffix} scan without EchoTime in their sidecars; "
                                     "cannot choose one"))
                continue
            else:
                echo_time = nearest_echo(times, target_ms)
                _, path, pairs = echo_list[times.index(echo_time)]
            for other_time, other, _ in echo_list:
                if other != path:
                    found.ignored.append((other, f"echo at {other_time:g} ms; the {echo_time:g} ms echo is read "
                                          f"(nearest --echo-time {target_ms:g} ms)"))
            scans.append((path, pairs, suffix))
            if echo_time is not None:
                chosen[path] = echo_time
        found.cases = self._cases(input_dir, scans, chosen) + problems
        if not found.cases:
            raise RunError(f"{input_dir}: no T2*-weighted scan ({', '.join(SCAN_SUFFIXES)}) in sub-*/[ses-*/]anat/"
                           + (" for the participant/session labels given" if participants or sessions else ""))
        return found

    def _anat_files(self, input_dir: Path) -> list[Path]:
        """The files of every sub-*/[ses-*/]anat/ folder, in path order (hidden ones skipped)."""
        files: list[Path] = []
        for subject in sorted(input_dir.glob("sub-*")):
            if not subject.is_dir():
                continue
            for anat in sorted([*subject.glob("anat"), *subject.glob("ses-*/anat")]):
                files.extend(path for path in sorted(anat.iterdir()) if not path.name.startswith("."))
        return files

    def _cases(self, input_dir: Path, scans: list, chosen: dict[Path, float]) -> list[Case]:
        kept = [(path, {k: v for k, v in pairs.items() if k not in DERIVED_DROPPED}, suffix)
                for path, pairs, suffix in scans]
        stems = [bids_name(pairs) for _, pairs, _ in kept]
        cases = []
        for (path, pairs, suffix), stem in sorted(zip(kept, stems), key=lambda item: str(item[0][0])):
            # a T2starw and an swi of one session: both are processed, their masks told apart by desc
            desc = DESC if stems.count(stem) == 1 else f"{DESC}{suffix}"
            folder = self.output / f"sub-{pairs['sub']}" / (f"ses-{pairs['ses']}" if "ses" in pairs else "") / "anat"
            relative = path.relative_to(input_dir).as_posix()
            details = {"bids_source": relative, "entities": pairs, "suffix": suffix, "desc": desc,
                       "echo_time_ms": chosen.get(path)}
            cases.append(Case(path.name.split(".")[0], path, folder / f"{stem}_desc-{desc}_mask.nii.gz", [relative],
                              details=details))
        return cases

    def _derived(self, case: Case, kind: str) -> Path:
        assert case.output_path is not None
        return case.output_path.with_name(case.output_path.name.replace("_mask.nii.gz", kind))

    def report_files(self, case: Case) -> ReportFiles:
        """With `--reports on`: the generic tables and labelled mask under reports/, pictures in qc/."""
        reports = self.output / "reports"
        return ReportFiles(reports / f"{case.case_id}_lesions.csv", reports / f"{case.case_id}_lesions.json",
                           reports / f"{case.case_id}_labels.nii.gz", self.output / "qc" / f"{case.case_id}.png")

    def probability_file(self, case: Case) -> Path:
        return self._derived(case, "_probseg.nii.gz")

    def case_files(self, case: Case) -> list[Path]:
        """The mask's sidecar, the lesion table and its dictionary, the regional counts (unless --location off)."""
        return [self._derived(case, "_mask.json"), self._derived(case, "_lesions.tsv"),
                self._derived(case, "_lesions.json"),
                *([self._derived(case, "_regions.tsv")] if self.options.location == "on" else [])]

    def write_case_files(self, case: Case, lesions: list, census: dict | None, info: dict) -> None:
        sidecar_file, table_file, dictionary_file, *regions_file = self.case_files(case)
        echo_time = case.details.get("echo_time_ms")
        described = {
            "Description": f"Cerebral microbleed mask (1 = microbleed) by valdocmb's {info.get('method', '')} method",
            "Type": "Lesion",
            "Sources": [f"bids:raw:{case.details['bids_source']}"],
            "SpatialReference": f"bids:raw:{case.details['bids_source']}",  # the scan's own grid, exactly
            "GeneratedBy": {"Name": "valdocmb", "Version": __version__, "Method": info.get("method"),
                            "WeightsVersion": (info.get("weights") or {}).get("version"),
                            "Parameters": info.get("config") or info.get("parameters")},
            **({"SourceEchoTime": echo_time / 1000} if echo_time is not None else {}),
            "CMBCount": len(lesions),
            "TotalVolumeMM3": round(sum(lesion.volume_mm3 for lesion in lesions), 3),
            **({"Regions": census} if census else {}),
        }
        write_text_atomic(json.dumps(described, indent=1, default=str), sidecar_file)
        rows = [{k: ("n/a" if v in (None, "") else v) for k, v in asdict(lesion).items()} for lesion in lesions]
        write_text_atomic(tsv(LESION_FIELDS, rows), table_file)
        dictionary = {name: {"Description": LESION_COLUMNS[name], **({"Units": UNITS[name]} if name in UNITS else {})}
                      for name in LESION_FIELDS}
        write_text_atomic(json.dumps(dictionary, indent=1), dictionary_file)
        if regions_file:
            write_text_atomic(tsv(CENSUS_FIELDS, [{k: (v if v != "" else "n/a") for k, v in (census or {}).items()}]),
                              regions_file[0])

    def earlier_counts(self, case: Case) -> dict:
        try:
            described = json.loads(self._derived(case, "_mask.json").read_text())
            return {"cmb_count": described["CMBCount"], "total_volume_mm3": described["TotalVolumeMM3"],
                    **described.get("Regions", {})}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def write_records(self, outcomes: list[CaseOutcome], run_file) -> None:
        self.write_dataset_description()
        write_text_atomic("\n".join(BIDSIGNORE) + "\n", self.output / ".bidsignore")
        failed = {outcome.case.output_path: outcome for outcome in outcomes if outcome.error}
        self.write_scans_table(failed)

    def write_dataset_description(self) -> None:
        container = {"Type": "docker", "Tag": os.environ.get("CMB_IMAGE", f"valdocmb:{__version__}")}
        description = {
            "Name": "valdocmb cerebral microbleed segmentation", "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "valdocmb", "Version": __version__,
                             "Description": "Cerebral microbleed detection and segmentation (VALDO Task 2)",
                             **({"Container": container} if Path("/.dockerenv").exists() or "CMB_IMAGE" in os.environ
                                else {})}],
            "DatasetLinks": {"raw": Path(self.options.input).resolve().as_uri()},
        }
        write_text_atomic(json.dumps(description, indent=1), self.output / "dataset_description.json")
        write_text_atomic(DERIVATIVES_README, self.output / "README.md")

    def write_scans_table(self, failed: dict | None = None) -> None:
        """cmb_scans.tsv from every mask sidecar in the output (what all shards wrote) and this run's failures."""
        rows = []
        for sidecar_file in sorted(self.output.glob(f"sub-*/**/*_desc-{DESC}*_mask.json")):
            try:
                described = json.loads(sidecar_file.read_text())
            except (OSError, ValueError):
                continue
            pairs, _ = entities(sidecar_file.name.removesuffix("_mask.json"))
            rows.append({"participant_id": f"sub-{pairs['sub']}", "session_id": f"ses-{pairs['ses']}" if "ses" in pairs
                         else "n/a", "source": described.get("Sources", ["n/a"])[0].removeprefix("bids:raw:"),
                         "mask": sidecar_file.relative_to(self.output).as_posix().replace(".json", ".nii.gz"),
                         "status": "ok", "echo_time_ms": round(1000 * described["SourceEchoTime"], 3)
                         if "SourceEchoTime" in described else "n/a", "cmb_count": described.get("CMBCount", "n/a"),
                         "total_volume_mm3": described.get("TotalVolumeMM3", "n/a"),
                         **{k: (v if v != "" else "n/a") for k, v in described.get("Regions", {}).items()}})
        for outcome in (failed or {}).values():
            pairs = outcome.case.details.get("entities", {})
            rows.append({"participant_id": f"sub-{pairs.get('sub', 'n/a')}",
                         "session_id": f"ses-{pairs['ses']}" if "ses" in pairs else "n/a",
                         "source": outcome.case.details.get("bids_source", "n/a"), "mask": "n/a",
                         "status": "failed"})
        write_text_atomic(tsv(SCAN_COLUMNS, rows), self.output / SCANS_TABLE)
        columns = {"participant_id": "The participant", "session_id": "The session (n/a without sessions)",
                   "source": "The scan, relative to the BIDS dataset", "mask": "Its microbleed mask, relative to here",
                   "status": "ok, or failed (this run's failures; see run.json for why)",
                   "echo_time_ms": "Echo time of the image used (multi-echo scans)",
                   "cmb_count": "Number of microbleeds", "total_volume_mm3": "Their total volume"}
        columns.update({name: f"Regional count or verdict ({name}); see the documentation" for name in CENSUS_FIELDS})
        write_text_atomic(json.dumps({k: {"Description": v} for k, v in columns.items()}, indent=1),
                          self.output / SCANS_TABLE.replace(".tsv", ".json"))


def tsv(columns, rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), delimiter="\t", lineterminator="\n",
                            extrasaction="ignore", restval="n/a")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def sidecar(path: Path, root: Path) -> dict:
    """A data file's metadata by the BIDS inheritance principle: every JSON from the dataset's top down to the file's
    folder whose entities are a subset of the file's and whose suffix is the file's, later (deeper) ones winning."""
    pairs, suffix = entities(nifti_stem(path))
    merged: dict = {}
    folders = [root, *reversed([p for p in path.parent.parents if root in p.parents]), path.parent]
    for folder in dict.fromkeys(folders):
        for candidate in sorted(folder.glob(f"*{suffix}.json")):
            stem = candidate.name.removesuffix(".json")
            try:
                own, own_suffix = entities(stem) if stem != suffix else ({}, suffix)
            except ValueError:
                continue
            if own_suffix == suffix and all(pairs.get(k) == v for k, v in own.items()):
                try:
                    merged.update(json.loads(candidate.read_text()))
                except (OSError, ValueError):
                    pass
    return merged
