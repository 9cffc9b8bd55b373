"""A PNG of simulated cases with microbleeds and mimics marked, so anyone can look at what the simulator makes.

    valdocmb-synth-figure --data DIR --out simulated.png [--cases 4]
    valdocmb-synth-figure --data DIR --out variety.png --variety [--cases 12]

One row per case (cases with a visible microbleed first): the axial slice through a microbleed with every object
near that slice marked (red: microbleed, cyan: vein, yellow: calcification), then 24 mm close-ups of a microbleed
(label outlined), a vein and a calcification. With --variety: a grid of the cases side by side, one axial slice
through the middle of each brain, titled with what was drawn for it (anatomy source, grid, field, echo time, SNR,
atrophy, white-matter patches, artefacts), to show how far the cases differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

COLOURS = {"cmb": "red", "vein": "cyan", "calcification": "yellow", "flow_void": "orange"}


def _load(data: Path, subject: str):
    image = sitk.ReadImage(str(data / f"{subject}_space-T2S_desc-masked_T2S.nii.gz"), sitk.sitkFloat32)
    label = sitk.ReadImage(str(data / f"{subject}_space-T2S_CMB.nii.gz"))
    return image, sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)


def _index(image, point):
    return np.array(image.TransformPhysicalPointToIndex([float(p) for p in point]))[::-1]  # z, y, x


def _closeup(ax, array, label, zyx, spacing, title, vmax, half_mm=12.0):
    z, y, x = zyx
    hy, hx = int(half_mm / spacing[1]), int(half_mm / spacing[0])
    crop = array[z, max(y - hy, 0):y + hy, max(x - hx, 0):x + hx]
    ax.imshow(crop, cmap="gray", vmin=0, vmax=vmax, aspect=spacing[1] / spacing[0])
    if label is not None and label[z].any():
        ax.contour(label[z, max(y - hy, 0):y + hy, max(x - hx, 0):x + hx], [0.5], colors="red", linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def make_figure(data: Path, out: Path, n_cases: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metas = [json.loads(p.read_text()) for p in sorted(data.glob("*_sim.json"))]
    metas.sort(key=lambda m: -min(1, m["counts"]["cmb_visible"]))   # cases with a visible CMB first
    metas = metas[:n_cases]
    if not metas:
        raise SystemExit(f"{data}: no simulated cases (*_sim.json)")
    fig, axes = plt.subplots(len(metas), 4, figsize=(13, 3.4 * len(metas)), squeeze=False)
    for row, meta in zip(axes, metas):
        image, array, label = _load(data, meta["subject"])
        spacing = image.GetSpacing()
        vmax = float(np.percentile(array[array > 0], 99.5))
        acq = meta["acquisition"]
        by_kind = {k: [o for o in meta["objects"] if o["type"] == k and
                       (o.get("visible", True) or k != "cmb")] for k in COLOURS}
        anchor = (by_kind["cmb"] or by_kind["vein"] or meta["objects"])[0]
        z = int(np.clip(_index(image, anchor["centre_mm"])[0], 0, array.shape[0] - 1))
        ax = row[0]
        ax.imshow(array[z], cmap="gray", vmin=0, vmax=vmax, aspect=spacing[1] / spacing[0])
        for obj in meta["objects"]:
            oz, oy, ox = _index(image, obj["centre_mm"])
            if abs(oz - z) * spacing[2] <= max(spacing[2], 2.0):
                ax.scatter([ox], [oy], s=90, facecolors="none", edgecolors=COLOURS[obj["type"]], linewidths=1.0)
        ax.set_title(f"{meta['subject']} {acq['grid']} {acq['b0_tesla']:.1f} T TE {acq['te_ms']:.0f} ms "
                     f"{'x'.join(f'{s:.2g}' for s in acq['spacing'])} mm\n"
                     f"{meta['counts']['cmb_visible']}/{meta['counts']['cmb']} CMB visible, "
                     f"{meta['counts']['vein']} veins, {meta['counts']['calcification']} calc.", fontsize=8)
        ax.axis("off")
        for ax, kind in zip(row[1:], ("cmb", "vein", "calcification")):
            if by_kind[kind]:
                obj = by_kind[kind][0]
                extra = (f" vis. {obj['visible_diameter_mm']:.1f} mm" if kind == "cmb" else "")
                _closeup(ax, array, label if kind == "cmb" else None, _index(image, obj["centre_mm"]), spacing,
                         f"{kind}: core {obj['core_diameter_mm']:.1f} mm, chi {obj['chi_ppm']:.2g} ppm{extra}", vmax)
            else:
                ax.axis("off")
                ax.set_title(f"no {kind} in this case", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def make_variety_figure(data: Path, out: Path, n_cases: int = 12, columns: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metas = [json.loads(p.read_text()) for p in sorted(data.glob("*_sim.json"))][:n_cases]
    if not metas:
        raise SystemExit(f"{data}: no simulated cases (*_sim.json)")
    rows = -(-len(metas) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, meta in zip(axes.ravel(), metas):
        image, array, _ = _load(data, meta["subject"])
        spacing = image.GetSpacing()
        slices = np.flatnonzero(array.reshape(array.shape[0], -1).max(axis=1) > 0)
        z = int(slices[int(len(slices) * 0.6)]) if len(slices) else array.shape[0] // 2
        vmax = float(np.percentile(array[array > 0], 99.5)) if (array > 0).any() else 1.0
        ax.imshow(array[z], cmap="gray", vmin=0, vmax=vmax, aspect=spacing[1] / spacing[0])
        acq, drawn = meta["acquisition"], meta.get("randomisation", {})
        artefacts = ", ".join(f"{name} {drawn[key]:.2g}" for name, key in
                              (("atrophy", "atrophy_mm"), ("Gibbs", "gibbs"), ("ghosts", "ghosts"),
                               ("edges", "mask_edges")) if drawn.get(key))
        ax.set_title(f"{meta['subject']} {meta.get('anatomy', {}).get('source', 'mni2009a')} {acq['grid']} "
                     f"{acq['b0_tesla']:.1f} T TE {acq['te_ms']:.0f} SNR {acq['snr_wm']:.0f}\n"
                     f"{'x'.join(f'{s:.2g}' for s in acq['spacing'])} mm, {meta['counts']['vein']} veins, "
                     f"WMH {drawn.get('wmh', 0):.0f}\n{artefacts}", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-synth-figure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by valdocmb-synth")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--cases", type=int, default=None, help="how many cases (default 4, or 12 with --variety)")
    parser.add_argument("--variety", action="store_true", help="a grid of cases side by side")
    args = parser.parse_args(argv)
    if args.variety:
        print(make_variety_figure(args.data, args.out, args.cases or 12))
    else:
        print(make_figure(args.data, args.out, args.cases or 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
