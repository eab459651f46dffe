"""Regions of interest on fsaverage5 from the Destrieux atlas (FreeSurfer aparc.a2009s).

TRIBE v2 predicts 20,484 vertices: left hemisphere 0-10241, then right 10242-20483. A region is a
set of Destrieux label names, on the left hemisphere only or on both. An unknown label name is an
error, never silently skipped: a typo would otherwise turn a reward into the mean of nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

N_VERTICES_PER_HEMI = 10242
N_VERTICES = 2 * N_VERTICES_PER_HEMI


@dataclass(frozen=True)
class RegionDef:
    labels: tuple[str, ...]
    left_only: bool


# The reference experiment's 20 regions.
REGIONS: dict[str, RegionDef] = {
    "broca": RegionDef(("G_front_inf-Opercular", "G_front_inf-Triangul"), True),
    "wernicke": RegionDef(("G_temp_sup-Lateral", "S_temporal_sup"), True),
    "angular": RegionDef(("G_pariet_inf-Angular",), True),
    "supramarginal": RegionDef(("G_pariet_inf-Supramar",), True),
    "auditory": RegionDef(("G_temp_sup-G_T_transv", "S_temporal_transverse"), False),
    "sts": RegionDef(("Lat_Fis-post", "G_temp_sup-Plan_tempo"), False),
    "default_mode": RegionDef(("G_cingul-Post-dorsal", "G_cingul-Post-ventral", "G_precuneus"), False),
    "anterior_cingulate": RegionDef(("G_and_S_cingul-Ant", "G_and_S_cingul-Mid-Ant"), False),
    "dlpfc": RegionDef(("G_front_middle", "S_front_middle"), False),
    "superior_frontal": RegionDef(("G_front_sup", "S_front_sup"), False),
    "v1": RegionDef(("S_calcarine",), False),
    "lateral_occipital": RegionDef(("G_occipital_middle", "G_occipital_sup", "S_oc_middle_and_Lunatus"), False),
    "fusiform": RegionDef(("G_oc-temp_lat-fusifor",), False),
    "parahippocampal": RegionDef(("G_oc-temp_med-Parahip",), False),
    "insula": RegionDef(("G_insular_short", "G_Ins_lg_and_S_cent_ins"), False),
    "middle_temporal": RegionDef(("G_temporal_middle", "S_temporal_inf"), False),
    "inferior_temporal": RegionDef(("G_temporal_inf",), False),
    "superior_parietal": RegionDef(("G_parietal_sup", "S_intrapariet_and_P_trans"), False),
    "motor": RegionDef(("G_precentral", "S_precentral-inf-part", "S_precentral-sup-part"), False),
    "somatosensory": RegionDef(("G_postcentral", "S_postcentral", "S_central"), False),
}
ROI_NAMES: tuple[str, ...] = tuple(REGIONS)
# Whole-cortex summaries reported beside the regions (the medial wall is excluded).
SUMMARY_NAMES: tuple[str, ...] = ("left_hemisphere", "right_hemisphere", "global")


@dataclass(frozen=True)
class Atlas:
    """Destrieux labels per fsaverage5 vertex for both hemispheres."""

    labels: tuple[str, ...]
    map_left: np.ndarray  # (10242,) label index per vertex
    map_right: np.ndarray

    def label_mask(self, name: str, hemisphere: str) -> np.ndarray:
        if name not in self.labels:
            raise KeyError(f"unknown Destrieux label {name!r}")
        index = self.labels.index(name)
        half = self.map_left if hemisphere == "left" else self.map_right
        return half == index

    def region_mask(self, region: str | RegionDef) -> np.ndarray:
        """Boolean (20484,) mask of a named region or an explicit definition."""
        if isinstance(region, str):
            if region not in REGIONS:
                raise KeyError(f"unknown region {region!r}; known: {', '.join(ROI_NAMES)}")
            region = REGIONS[region]
        left = np.zeros(N_VERTICES_PER_HEMI, bool)
        right = np.zeros(N_VERTICES_PER_HEMI, bool)
        for label in region.labels:
            left |= self.label_mask(label, "left")
            if not region.left_only:
                right |= self.label_mask(label, "right")
        return np.concatenate([left, right])

    def cortex_mask(self) -> np.ndarray:
        """All labelled cortex: every vertex that is neither Unknown nor the medial wall."""
        excluded = [self.labels.index(n) for n in ("Unknown", "Medial_wall") if n in self.labels]
        both = np.concatenate([self.map_left, self.map_right])
        return ~np.isin(both, excluded)

    def summary_masks(self) -> dict[str, np.ndarray]:
        cortex = self.cortex_mask()
        left = np.zeros(N_VERTICES, bool)
        left[:N_VERTICES_PER_HEMI] = True
        return {"left_hemisphere": cortex & left, "right_hemisphere": cortex & ~left, "global": cortex}


@lru_cache(maxsize=1)
def load_destrieux() -> Atlas:
    """The Destrieux atlas on fsaverage5 via nilearn (offline when NILEARN_DATA holds a copy)."""
    from nilearn import datasets

    bunch = datasets.fetch_atlas_surf_destrieux(verbose=0)
    labels = tuple(str(x.decode() if isinstance(x, bytes) else x) for x in bunch["labels"])
    atlas = Atlas(labels, np.asarray(bunch["map_left"]), np.asarray(bunch["map_right"]))
    if atlas.map_left.shape != (N_VERTICES_PER_HEMI,) or atlas.map_right.shape != (N_VERTICES_PER_HEMI,):
        raise ValueError("Destrieux atlas is not on fsaverage5 (expected 10242 vertices per hemisphere)")
    return atlas


@lru_cache(maxsize=1)
def roi_masks() -> dict[str, np.ndarray]:
    """Masks of the 20 reference regions plus hemisphere and global summaries."""
    atlas = load_destrieux()
    masks = {name: atlas.region_mask(name) for name in ROI_NAMES}
    masks.update(atlas.summary_masks())
    return masks


def roi_means(prediction: np.ndarray, masks: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-region mean time course of a (T, 20484) prediction: name -> (T,)."""
    if prediction.ndim != 2 or prediction.shape[1] != N_VERTICES:
        raise ValueError(f"prediction must be (T, {N_VERTICES}), got {prediction.shape}")
    masks = roi_masks() if masks is None else masks
    return {name: prediction[:, mask].mean(axis=1) for name, mask in masks.items()}
