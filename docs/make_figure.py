"""Render docs/phantom.png: a healthy and a pathological phantom B-scan with their mask overlays.

Run from the repository root: ``python docs/make_figure.py [OUT.png]``. Uses the project's own
generator (:func:`anogan_ray.data.phantom.generate_volume`) and overlay
(:func:`anogan_ray.data.phantom.render_bscan_overlay`) with the demo preset's sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from anogan_ray.config import load_config  # noqa: E402
from anogan_ray.data.phantom import (  # noqa: E402
    PATHOLOGY_CODES,
    PATHOLOGY_COLORS,
    generate_volume,
    render_bscan_overlay,
)


def make_figure(out: str) -> None:
    """Write the README figure to ``out``."""
    cfg = load_config("demo").phantom
    centre = cfg.bscans_per_volume // 2
    healthy = generate_volume(cfg, subject_index=0, pathological=False)
    # of the cohort's pathological subjects, the B-scan that shows the most lesion types
    # (then the most lesion pixels)
    best = (-1, None, 0)
    for subject in range(cfg.healthy_subjects, cfg.healthy_subjects + cfg.pathological_subjects):
        volume = generate_volume(cfg, subject_index=subject, pathological=True)
        for b, m in enumerate(volume.mask):
            score = len(np.unique(m[m > 0])) * 10**7 + np.count_nonzero(m)
            if score > best[0]:
                best = (score, volume, b)
    _, sick, shown = best

    fig, axes = plt.subplots(2, 2, figsize=(10, 11.2), dpi=100)
    panels = [
        (healthy.image[centre], None, f"healthy (B-scan {centre}, through the fovea)"),
        (sick.image[shown], None, f"pathological (B-scan {shown})"),
        (healthy.image[centre], healthy.mask[centre], "healthy: true ILM and Bruch's membrane"),
        (sick.image[shown], sick.mask[shown], "pathological: pixel-level masks"),
    ]
    for ax, (bscan, mask, title) in zip(axes.ravel(), panels):
        ax.imshow(bscan if mask is None else render_bscan_overlay(bscan, mask), cmap="gray")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    for layers, ax, b in ((healthy.layers, axes[1, 0], centre), (sick.layers, axes[1, 1], shown)):
        ax.plot(layers[b, 0], color="tab:red", lw=0.8)
        ax.plot(layers[b, -1], color="tab:orange", lw=0.8)
    legend = [
        Patch(color=np.array(PATHOLOGY_COLORS[name]) / 255, label=name.replace("_", " "))
        for name in PATHOLOGY_CODES
    ]
    legend += [
        Patch(color="tab:red", label="ILM"),
        Patch(color="tab:orange", label="Bruch's membrane"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(
        f"Synthetic SD-OCT (anogan_ray.data.phantom): {cfg.height} x {cfg.width} px, "
        f"{cfg.spacing_x_um} µm A-scan spacing",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    make_figure(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("phantom.png")))
