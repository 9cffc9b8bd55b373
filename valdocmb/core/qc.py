"""QC pictures: one PNG per scan showing every detected CMB, and a static HTML page linking a batch's pictures.

Each panel is the axial slice through a lesion's centroid, 40 mm wide, the lesion outlined in red and numbered as in
the lesion table; a scan without detections gets three axial overview slices so the reader still sees the scan.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .imageio import image_like, write_bytes_checked, write_text_atomic
from .location import placed

MAX_PANELS = 24
HALF_WIDTH_MM = 20.0


def qc_png(image: sitk.Image, labels: np.ndarray, lesions, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Show the scan in LPS axis order so every picture reads the same way (patient left on the right).
    oriented = sitk.DICOMOrient(image, "LPS")
    labels_o = sitk.GetArrayFromImage(sitk.DICOMOrient(image_like(labels, image), "LPS"))
    array = sitk.GetArrayFromImage(oriented).astype(np.float32)
    array[~np.isfinite(array)] = 0
    inside = array[array != 0]
    vmin, vmax = (np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0))
    spacing = oriented.GetSpacing()

    panels = []
    for lesion in lesions[:MAX_PANELS]:
        index = oriented.TransformPhysicalPointToIndex((lesion.world_x_mm, lesion.world_y_mm, lesion.world_z_mm))
        panels.append((lesion.id, index))
    if not panels:
        nz = array.shape[0]
        panels = [(None, (array.shape[2] // 2, array.shape[1] // 2, int(nz * f))) for f in (0.3, 0.5, 0.7)]
    cols = min(6, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (lesion_id, (x, y, z)) in zip(axes.ravel(), panels):
        z = int(np.clip(z, 0, array.shape[0] - 1))
        if lesion_id is None:
            ax.imshow(array[z], cmap="gray", vmin=vmin, vmax=vmax, aspect=spacing[1] / spacing[0])
            ax.set_title(f"slice {z}", fontsize=8)
            continue
        hy, hx = int(HALF_WIDTH_MM / spacing[1]), int(HALF_WIDTH_MM / spacing[0])
        y0, x0 = max(y - hy, 0), max(x - hx, 0)
        crop = array[z, y0:y + hy, x0:x + hx]
        ax.imshow(crop, cmap="gray", vmin=vmin, vmax=vmax, aspect=spacing[1] / spacing[0])
        outline = labels_o[z, y0:y + hy, x0:x + hx]
        if (outline == lesion_id).any():  # one voxel outside the lesion, so small foci stay visible
            ax.contour(ndimage.binary_dilation(outline == lesion_id), [0.5], colors="red", linewidths=0.9)
        others = (outline > 0) & (outline != lesion_id)
        if others.any():
            ax.contour(others, [0.5], colors="orange", linewidths=0.6)
        ax.text(min(x - x0 + 3, crop.shape[1] - 1), max(y - y0 - 3, 0), str(lesion_id), color="yellow",
                fontsize=9, fontweight="bold")
        lesion = lesions[lesion_id - 1]
        place = f"\n{lesion.region} ({lesion.side[:1].upper()}), {lesion.mars_class}" if lesion.region else ""
        ax.set_title(f"#{lesion_id} slice {z}  {lesion.volume_mm3:.1f} mm3  p={lesion.max_probability:.2f}{place}",
                     fontsize=7)
    more = f" (first {MAX_PANELS} shown)" if len(lesions) > MAX_PANELS else ""
    fig.suptitle(f"{title}: {len(lesions)} CMB{'s' if len(lesions) != 1 else ''} detected{more}", fontsize=10)
    fig.tight_layout()
    try:
        return write_bytes_checked(lambda tmp: fig.savefig(tmp, dpi=80, format="png"), path)
    finally:
        plt.close(fig)


def _regions(row: dict) -> str:
    """The MARS counts of a summary row, or why there are none."""
    status = row.get("location", "")
    if placed(status):
        strictly = " (strictly lobar)" if row.get("strictly_lobar") == "yes" else ""
        doubt = "" if status == "ok" else f" ({html.escape(status)})"
        return f"{row['n_lobar']} / {row['n_deep']} / {row['n_infratentorial']}{strictly}{doubt}"
    return html.escape(status)


def overview_html(rows: list[dict], path: Path, title: str = "CMB detection: QC overview") -> Path:
    """A static page: one row per scan with its count, volume, status and QC picture."""
    body = []
    for row in rows:
        picture = row.get("qc")
        cell = (f'<a href="{html.escape(picture)}"><img src="{html.escape(picture)}" loading="lazy"></a>'
                if picture else "")
        status = html.escape(row["status"] + (f": {row['error']}" if row.get("error") else ""))
        body.append(f"<tr class='{'failed' if row['status'] == 'failed' else 'ok'}'><td>{html.escape(row['case'])}</td>"
                    f"<td>{row.get('cmb_count', '')}</td><td>{row.get('total_volume_mm3', '')}</td>"
                    f"<td>{_regions(row)}</td>"
                    f"<td>{status}</td><td>{cell}</td></tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} td{{padding:4px 8px;vertical-align:top;border-bottom:1px solid #ddd}}
img{{max-width:780px}} tr.failed td{{background:#fee}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table><tr><th>case</th><th>CMBs</th><th>volume (mm&sup3;)</th><th>lobar / deep / infratentorial</th><th>status</th>
<th>QC picture</th></tr>
{chr(10).join(body)}
</table></body></html>
"""
    return write_text_atomic(page, path)
