"""`valdo2021`: the 2021 challenge's flat folder of gzipped NIfTI, `sub-XXX_space-T2S_desc-masked_T2S.nii.gz`
(+ T1/T2 companions); masks to `images/sub-XXX_space-T2S_prediction.nii.gz`, and `results.json` as the 2021
evalutils containers wrote it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import RunError
from ..imageio import strip_image_extension, write_text_atomic
from .base import Case, CaseOutcome, Discovery, Layout, entries

VALDO_T2S = re.compile(r"^(sub-[A-Za-z0-9]+)_space-([A-Za-z0-9]+)_desc-masked_T2S\.nii\.gz$")
VALDO_COMPANION = re.compile(r"^(sub-[A-Za-z0-9]+)_space-([A-Za-z0-9]+)_desc-masked_(T1|T2)\.nii\.gz$")
VALDO_LABEL = re.compile(r"^(sub-[A-Za-z0-9]+)_space-([A-Za-z0-9]+)_CMB\.nii\.gz$")


def valdo_output_name(subject: str, space: str = "T2S") -> str:
    return f"{subject}_space-{space}_prediction.nii.gz"


class Valdo2021(Layout):
    name = "valdo2021"

    @classmethod
    def detect(cls, input_dir: Path) -> bool:
        return any(VALDO_T2S.match(p.name) for p in input_dir.iterdir())

    def discover(self, input_dir: Path) -> Discovery:
        found = Discovery(self, [])
        scans: dict[tuple[str, str], Path] = {}
        companions: dict[str, list[str]] = {}
        problems: list[Case] = []
        for path in entries(input_dir, found):
            if m := VALDO_T2S.match(path.name):
                scans[(m.group(1), m.group(2))] = path  # a folder or dangling link of that name fails when read
            elif m := VALDO_COMPANION.match(path.name):
                companions.setdefault(m.group(1), []).append(path.name)
            elif VALDO_LABEL.match(path.name):
                found.ignored.append((path, "a training label (_CMB), not an input"))
            elif path.is_dir():
                found.ignored.append((path, "a folder"))
            else:
                problems.append(Case(
                    strip_image_extension(path.name), path, None, [path.name],
                    error=f"{path}: not a VALDO T2* file name; expected sub-<id>_space-T2S_desc-masked_T2S.nii.gz",
                ))
        subjects = [subject for subject, _ in scans]
        cases: dict[str, Case] = {}
        for (subject, space), path in sorted(scans.items()):
            # one subject under two space- labels: two cases, two masks (their names carry the label)
            case_id = subject if subjects.count(subject) == 1 else f"{subject}_space-{space}"
            cases[case_id] = Case(case_id, path, self.output / "images" / valdo_output_name(subject, space),
                                  [path.name])
        for subject, names in sorted(companions.items()):
            owners = [case for case in cases.values() if case.case_id.split("_space-")[0] == subject]
            for case in owners:
                case.input_names.extend(names)
            if not owners:
                problems.append(Case(
                    subject, None, None, names,
                    error=f"{input_dir / names[0]}: {subject} has {', '.join(names)} but no T2* scan "
                    f"({subject}_space-T2S_desc-masked_T2S.nii.gz)",
                ))
        if not cases and not problems:
            raise RunError(f"{input_dir}: no VALDO T2* scan (sub-*_space-*_desc-masked_T2S.nii.gz) found")
        found.cases = [cases[c] for c in sorted(cases)] + problems
        return found

    def write_records(self, outcomes: list[CaseOutcome], run_file) -> None:
        results = [valdo_results_entry(outcome.case, outcome.error) for outcome in outcomes]
        write_text_atomic(json.dumps(results, indent=2), run_file("results.json"))


def valdo_results_entry(case: Case, error: str | None) -> dict:
    """One results.json entry, as the VALDO 2021 (evalutils-era) containers wrote it."""
    outputs = [] if error or case.output_path is None else [
        {"type": "metaio_image", "filename": [case.output_path.name]}
    ]
    return {
        "outputs": outputs,
        "inputs": [{"type": "metaio_image", "filename": list(case.input_names)}],
        "error_messages": [error] if error else [],
    }
