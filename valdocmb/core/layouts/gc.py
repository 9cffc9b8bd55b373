"""`gc`: grand-challenge's sockets: `inputs.json`, one `.mha`/`.tif` per image socket folder; the mask to
`<output socket path>/output.mha`, and the value sockets (the count, the lesion list, the regional counts) as JSON
files at the output's top."""

from __future__ import annotations

import json
from pathlib import Path

from .. import report
from ..errors import RunError
from ..imageio import TIFF_EXTENSIONS, write_text_atomic
from .base import Case, Discovery, Layout

# Grand-challenge socket names (slugs) that hold the T2* scan, tried in this order when several image sockets exist.
GC_T2S_SLUG_HINTS = ("t2-star", "t2star", "t2s", "swi", "gre")
GC_DEFAULT_OUTPUT_PATH = "images/cerebral-microbleed-segmentation"
GC_IMAGE_SUFFIXES = (".mha", *TIFF_EXTENSIONS)


class GrandChallenge(Layout):
    name = "gc"
    always_located = True  # the regional counts are a value socket

    @classmethod
    def detect(cls, input_dir: Path) -> bool:
        return (input_dir / "inputs.json").is_file()

    def check_options(self) -> None:
        socket = (self.output / self.options.output_socket_path).resolve()
        if not socket.is_relative_to(self.output.resolve()):
            raise RunError(f"--output-socket-path {self.options.output_socket_path!r} leads outside the output "
                           f"folder {self.output}")

    def discover(self, input_dir: Path) -> Discovery:
        found = Discovery(self, [])
        inputs_json = input_dir / "inputs.json"
        try:
            sockets = json.loads(inputs_json.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"{inputs_json}: cannot be parsed: {exc}") from None
        if not isinstance(sockets, list):
            raise RunError(f"{inputs_json}: expected a list of socket values")
        image_sockets = {}
        for number, entry in enumerate(sockets):
            interface = entry.get("interface") if isinstance(entry, dict) else None
            if not isinstance(interface, dict) or not interface.get("slug"):
                found.ignored.append((inputs_json, f"entry {number} is not a socket value with an interface slug"))
                continue
            kind = str(interface.get("kind", "")).lower()
            if kind in ("image", "img") or entry.get("image") is not None:
                image_sockets[interface["slug"]] = interface.get("relative_path") or f"images/{interface['slug']}"
        slug = _choose_socket(image_sockets, self.options.input_socket, inputs_json)
        folder = input_dir / image_sockets[slug]
        out = self.output / self.options.output_socket_path / "output.mha"
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in GC_IMAGE_SUFFIXES) if folder.is_dir() else []
        if len(files) != 1:
            listed = ", ".join(p.name for p in files) or "none"
            found.cases = [Case(slug, None, out, [],
                                error=f"{folder}: expected exactly one .mha/.tif image, found {listed}")]
        else:
            found.cases = [Case(slug, files[0], out, [str(files[0].relative_to(input_dir))])]
        return found

    def case_files(self, case: Case) -> list[Path]:
        """The value outputs: the count, the lesion list, the regional counts (unless --location off)."""
        return [self.output / "number-of-cerebral-microbleeds.json", self.output / "cerebral-microbleeds.json",
                *([self.output / "cerebral-microbleed-regions.json"] if self.options.location == "on" else [])]

    def write_case_files(self, case: Case, lesions: list, census: dict | None, info: dict) -> None:
        count_file, lesions_file, *regions_file = self.case_files(case)
        write_text_atomic(json.dumps(len(lesions)), count_file)
        write_text_atomic(report.lesions_json(lesions, case.case_id, census), lesions_file)
        if regions_file:
            write_text_atomic(json.dumps(census, indent=1), regions_file[0])


def _choose_socket(image_sockets: dict[str, str], wanted: str | None, inputs_json: Path) -> str:
    if not image_sockets:
        raise RunError(f"{inputs_json}: lists no image socket")
    if wanted:
        if wanted not in image_sockets:
            raise RunError(f"{inputs_json}: no image socket {wanted!r}; present: {', '.join(image_sockets)}")
        return wanted
    if len(image_sockets) == 1:
        return next(iter(image_sockets))
    for hint in GC_T2S_SLUG_HINTS:
        for slug in image_sockets:
            if hint in slug.lower():
                return slug
    raise RunError(
        f"{inputs_json}: several image sockets ({', '.join(image_sockets)}) and none looks like T2*; "
        "name it with --input-socket"
    )
