"""`dicom`: a folder (any depth) of DICOM files as a hospital or PACS export holds them; one case per magnitude
T2*-weighted or SWI series, chosen by its tags (core.dicom). Masks are NIfTI in the series' geometry, named by the
series number (`series-007_CMB.nii.gz`; `study-2_series-007_CMB.nii.gz` when the folder holds several studies), with
lesion tables, QC pictures and a summary by default, as for a plain folder."""

from __future__ import annotations

from pathlib import Path

from ..dicom import DEFAULT_ECHO_TIME_MS, choose_echo, dicom_files, group_series, slice_stack, t2star_reason
from ..errors import CaseError, RunError
from .base import Case, Discovery, Layout
from .folder import FOLDER_MASK_SUFFIX, FOLDER_SCAN_EXTENSIONS


class Dicom(Layout):
    name = "dicom"
    reports_by_default = True

    @classmethod
    def detect(cls, input_dir: Path) -> bool:
        """DICOM files somewhere below, and no scan file at the top (that is a plain folder)."""
        top = [p for p in input_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
        if any(p.name.lower().endswith(FOLDER_SCAN_EXTENSIONS) for p in top):
            return False
        return bool(dicom_files(input_dir, limit=1))

    def discover(self, input_dir: Path) -> Discovery:
        found = Discovery(self, [])
        files = dicom_files(input_dir)
        if not files:
            raise RunError(f"{input_dir}: no DICOM file (with the DICM preamble) found at any depth")
        all_series, unreadable = group_series(files)
        for path, problem in unreadable:
            found.ignored.append((path, problem.split(": ", 1)[1]))
        studies = sorted({series.study_uid for series in all_series})
        target = getattr(self.options, "echo_time", None) or DEFAULT_ECHO_TIME_MS
        names: dict[str, int] = {}
        for series in sorted(all_series, key=lambda s: (studies.index(s.study_uid), s.number or 0, s.uid)):
            folder = common_folder(series.files())
            known_echoes = [te for te in series.echoes if te is not None]
            reason = t2star_reason(series.tags, max(known_echoes) if known_echoes else None)
            if reason:
                found.ignored.append((folder, f"{series.label()}: {reason}"))
                continue
            name = (f"study-{studies.index(series.study_uid) + 1}_" if len(studies) > 1 else "") + (
                f"series-{series.number:03d}" if series.number is not None else "series-unnumbered")
            names[name] = names.get(name, 0) + 1
            case_id = name if names[name] == 1 else f"{name}-{names[name]}"
            echo_time, echo_files = choose_echo(series, target)
            echo_times = sorted(te for te in series.echoes if te is not None)
            details = {"series": series.label(), "series_number": series.number,
                       "series_description": series.tags.get("description", ""),
                       "image_type": series.tags.get("image_type", ""), "echo_time_ms": echo_time,
                       "echo_times_ms": echo_times, "files": len(echo_files)}
            if len(series.echoes) > 1 and None in series.echoes:
                case = Case(case_id, folder, None, [str(folder.relative_to(input_dir))],
                            error=f"{folder} ({series.label()}): several echoes, some without EchoTime; cannot "
                            "tell which files make one volume")
            else:
                output = self.output / f"{case_id}{FOLDER_MASK_SUFFIX}.nii.gz"
                try:
                    stack = slice_stack(sorted(echo_files), f"{folder} ({series.label()})", series.file_tags)
                    case = Case(case_id, folder, output, [str(folder.relative_to(input_dir))], series_files=stack,
                                details=details)
                except CaseError as exc:  # not one volume: the case fails, named, the others run
                    case = Case(case_id, folder, None, [str(folder.relative_to(input_dir))], error=str(exc),
                                details=details)
                if len(series.echoes) > 1:
                    found.ignored.append((folder, f"{series.label()}: echoes at "
                                          f"{', '.join(f'{te:g}' for te in echo_times)} ms; the "
                                          f"{echo_time:g} ms echo is read (nearest --echo-time {target:g} ms)"))
            found.cases.append(case)
        if not found.cases:
            why = "; ".join(f"{path}: {reason}" for path, reason in found.ignored[:5])
            raise RunError(f"{input_dir}: {len(files)} DICOM file(s), but no magnitude T2*-weighted or SWI series "
                           f"among them ({why}{'; ...' if len(found.ignored) > 5 else ''})")
        return found


def common_folder(paths: list[Path]) -> Path:
    """The deepest folder holding all the paths."""
    folder = paths[0].parent
    while not all(folder == path.parent or folder in path.parents for path in paths):
        folder = folder.parent
    return folder
