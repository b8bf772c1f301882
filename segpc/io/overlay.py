"""QC overlay: nucleus and cell outlines with cell ids drawn on the image, for review by eye."""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

NUCLEUS_COLOUR = (255, 230, 0)  # yellow
CELL_COLOUR = (0, 200, 255)  # cyan


def draw_overlay(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """RGB copy of ``image`` with each labelled cell's outline, nucleus outline and id."""
    out = image.copy()
    thick = max(1, round(max(image.shape[:2]) / 600))
    for cid, sl in enumerate(ndi.find_objects(cells), start=1):
        if sl is None:
            continue
        oy, ox = sl[0].start, sl[1].start
        for labels, colour in ((cells, CELL_COLOUR), (nuclei, NUCLEUS_COLOUR)):
            m = (labels[sl] == cid).astype(np.uint8)
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(ox, oy))
            cv2.drawContours(out, contours, -1, colour, thick)
        ys, xs = np.nonzero(cells[sl] == cid)
        ys, xs = ys + oy, xs + ox
        org = (int(xs.mean()), int(ys.min()) - 2 if ys.min() > 12 else int(ys.max()) + 12)
        scale = 0.35 * thick + 0.15
        cv2.putText(out, str(int(cid)), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2)
        cv2.putText(out, str(int(cid)), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick)
    return out
