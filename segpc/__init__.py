"""segpc: myeloma plasma-cell segmentation (SegPC-2021 multi-scale Attention DeepLabv3+).

The method as a library. It imports torch, numpy and OpenCV, never Ray: the Ray jobs in
``ray_jobs`` only wire these pieces into distributed stages.
"""

__version__ = "0.1.0"
