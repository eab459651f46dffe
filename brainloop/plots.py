"""Figures: cortical surface maps on fsaverage5 (nilearn) and training curves (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainloop.rois import N_VERTICES, N_VERTICES_PER_HEMI

VIEWS = (("left", "lateral"), ("left", "medial"), ("right", "lateral"), ("right", "medial"))


def surface_figure(values: np.ndarray, path: str | Path, title: str = "", symmetric: bool = True,
                   cmap: str = "RdBu_r", vmax: float | None = None) -> Path:
    """Four views (left/right x lateral/medial) of a (20484,) map on the inflated fsaverage5 surface."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import datasets, plotting

    if values.shape != (N_VERTICES,):
        raise ValueError(f"surface values must be ({N_VERTICES},), got {values.shape}")
    mesh = datasets.load_fsaverage("fsaverage5")
    sulc = datasets.load_fsaverage_data(mesh="fsaverage5", mesh_type="inflated", data_type="sulcal")
    halves = {"left": values[:N_VERTICES_PER_HEMI], "right": values[N_VERTICES_PER_HEMI:]}
    vmax = float(np.nanmax(np.abs(values))) if vmax is None else vmax
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), subplot_kw={"projection": "3d"})
    for ax, (hemi, view) in zip(axes, VIEWS, strict=True):
        plotting.plot_surf_stat_map(
            mesh["inflated"].parts[hemi], halves[hemi], hemi=hemi, view=view,
            bg_map=sulc.data.parts[hemi], axes=ax, colorbar=False, cmap=cmap, vmax=vmax,
            symmetric_cbar=symmetric, figure=fig, threshold=1e-6 * vmax, bg_on_data=True,
        )
        ax.set_title(f"{hemi} {view}", fontsize=12)
    sm = plt.cm.ScalarMappable(cmap=plt.get_cmap(cmap),
                               norm=plt.Normalize(-vmax if symmetric else 0, vmax))
    fig.colorbar(sm, ax=axes, fraction=0.015, pad=0.02, label="predicted BOLD (a.u.)")
    if title:
        fig.suptitle(title, fontsize=13)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

