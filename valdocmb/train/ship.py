"""Ship three-stage weights: put a trained folder's networks into the product's weights folder with what was
measured on them.

    python -m valdocmb.train.ship ~/.cache/valdocmb/weights-stream [--into weights] [--dry-run]

The three network files replace the target's (overwritten, never kept beside the new ones). The manifest's
three-stage entries move with them: each file's record (sha256, architecture, training command, learning curve),
the training record, and every entry measured or chosen on those networks (lesion rule, validation, comparison,
candidate budget, int8 calibration, batch-norm reference). Entries for other weights (nnU-Net) stay. An entry the
source lacks is removed from the target rather than left describing the old networks.

Refused, with nothing changed, when a source file does not match its recorded sha256, when an entry names other
weights than the source's, or when the source has no lesion rule (without one inference keeps every component, so
shipping would silently change the product's masks): choose it first with `valdocmb-tune --record`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from ..core import manifest
from ..core.errors import CaseError
from ..core.imageio import write_bytes_checked
from ..core.lesion_rule import MANIFEST_KEY as LESION_RULE_KEY
from ..core.logs import setup_logging
from ..core.three_stage import BATCH_NORM_KEY, BUDGET_KEY, INT8_KEY, WEIGHT_FILES, version_of
from ..core.weights import SHIPPED_WEIGHTS_DIR, sha256

log = logging.getLogger("valdocmb.ship")

TRAINING_KEY = "three_stage_training"
# Every manifest entry that belongs to one set of three-stage networks.
THREE_STAGE_KEYS = (TRAINING_KEY, *manifest.THREE_STAGE_DEPENDENT, BUDGET_KEY, INT8_KEY, BATCH_NORM_KEY)


def checked_source(source: Path) -> tuple[dict, str]:
    """The source's manifest and its weights version, after checking every network file against its sha256 and
    every version-tagged entry against the version; a CaseError names the first problem."""
    content = manifest.read(source)
    digests = {}
    for name, relative in WEIGHT_FILES.items():
        path = source / relative
        recorded = content["files"].get(relative, {}).get("sha256")
        if not path.is_file():
            raise CaseError(f"{path}: missing; a three-stage weights folder holds {', '.join(WEIGHT_FILES.values())}")
        if not recorded:
            raise CaseError(f"{manifest.manifest_path(source)}: no sha256 recorded for {relative}")
        actual = sha256(path)
        if actual != recorded:
            raise CaseError(f"{path}: sha256 {actual[:12]} does not match the manifest's {recorded[:12]}")
        digests[name] = actual
    version = version_of(digests)
    for key in THREE_STAGE_KEYS:
        tagged = content.get(key, {}).get("weights") if isinstance(content.get(key), dict) else None
        if tagged is not None and tagged != version:
            raise CaseError(f"{manifest.manifest_path(source)}: {key!r} was made for weights {tagged}, not for these "
                            f"({version}); measure it again on these weights")
    if LESION_RULE_KEY not in content:
        raise CaseError(f"{manifest.manifest_path(source)}: no {LESION_RULE_KEY!r}: choose one first "
                        f"(`valdocmb-tune --cache DIR --weights {source} --record`)")
    return content, version


def ship(source: Path, into: Path, dry_run: bool = False) -> dict:
    """Replace `into`'s three-stage networks and their manifest entries by `source`'s; returns what changed."""
    source, into = Path(source), Path(into)
    if source.resolve() == into.resolve():
        raise CaseError(f"{source}: is the target folder itself")
    content, version = checked_source(source)
    carried = [key for key in THREE_STAGE_KEYS if key in content]
    before = manifest.read(into)
    removed = [key for key in THREE_STAGE_KEYS if key in before and key not in content]
    summary = {"version": version, "carried": carried, "removed": removed}
    if dry_run:
        return summary

    for relative in WEIGHT_FILES.values():   # the one write path: a reader never sees half a file
        (into / relative).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_checked(lambda tmp, relative=relative: shutil.copyfile(source / relative, tmp), into / relative)

    def change(target: dict) -> None:
        for relative in WEIGHT_FILES.values():
            target["files"][relative] = content["files"][relative]
        for key in THREE_STAGE_KEYS:
            if key in content:
                target[key] = content[key]
            else:
                target.pop(key, None)

    manifest.update(into, change)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.train.ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a trained three-stage weights folder (valdocmb-train --out)")
    parser.add_argument("--into", type=Path, default=SHIPPED_WEIGHTS_DIR,
                        help="the weights folder to update (default: the repository's weights/)")
    parser.add_argument("--dry-run", action="store_true", help="check and say what would change; change nothing")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        summary = ship(args.source, args.into, args.dry_run)
    except CaseError as exc:
        log.error("%s", exc)
        return 1
    log.info("%s three-stage weights %s into %s; entries carried: %s; removed, measured on the old networks "
             "only: %s", "would ship" if args.dry_run else "shipped", summary["version"], args.into,
             ", ".join(summary["carried"]) or "none", ", ".join(summary["removed"]) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
