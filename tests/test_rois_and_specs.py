"""Regions from the real Destrieux atlas and reward specs on hand-made time courses."""

import numpy as np
import pytest

from brainloop import rois
from brainloop.reward_spec import RewardSpec, scalar_reward


def test_broca_vertex_counts_from_atlas():
    atlas = rois.load_destrieux()
    assert atlas.label_mask("G_front_inf-Opercular", "left").sum() == 119
    assert atlas.label_mask("G_front_inf-Triangul", "left").sum() == 68
    broca = atlas.region_mask("broca")
    assert broca.sum() == 119 + 68
    assert not broca[rois.N_VERTICES_PER_HEMI :].any()  # left hemisphere only


def test_every_region_resolves_and_bilateral_regions_use_both_hemispheres():
    masks = rois.roi_masks()
    assert set(rois.ROI_NAMES) <= set(masks) and len(rois.ROI_NAMES) == 20
    for name in rois.ROI_NAMES:
        assert masks[name].shape == (rois.N_VERTICES,) and masks[name].sum() > 0, name
    auditory = masks["auditory"]
    assert auditory[: rois.N_VERTICES_PER_HEMI].any() and auditory[rois.N_VERTICES_PER_HEMI :].any()
    assert masks["global"].sum() == masks["left_hemisphere"].sum() + masks["right_hemisphere"].sum()
    assert masks["global"].sum() < rois.N_VERTICES  # medial wall and unknown are excluded


def test_unknown_labels_and_regions_are_errors():
    atlas = rois.load_destrieux()
    with pytest.raises(KeyError, match="unknown Destrieux label"):
        atlas.region_mask(rois.RegionDef(("G_front_inf-Opercularis",), True))
    with pytest.raises(KeyError, match="unknown region"):
        atlas.region_mask("brocca")


def test_roi_means_of_a_constant_region():
    pred = np.zeros((3, rois.N_VERTICES), np.float32)
    masks = rois.roi_masks()
    pred[:, masks["broca"]] = np.array([[1.0], [2.0], [3.0]])
    courses = rois.roi_means(pred)
    np.testing.assert_allclose(courses["broca"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="must be"):
        rois.roi_means(np.zeros((3, 100)))


COURSES = {"broca": np.array([1.0, 2.0, 3.0, 6.0]), "default_mode": np.array([0.0, 1.0, 1.0, 2.0]),
           "global": np.array([0.5, 0.5, 0.5, 0.5])}


def test_reward_specs_hand_cases():
    assert scalar_reward(RewardSpec(), COURSES) == pytest.approx(3.0)
    assert scalar_reward(RewardSpec(tr_window=(1, 3)), COURSES) == pytest.approx(2.5)
    assert scalar_reward(RewardSpec(direction="minimize"), COURSES) == pytest.approx(-3.0)
    weighted = RewardSpec(kind="weighted", weights={"broca": 1.0, "default_mode": -2.0})
    assert scalar_reward(weighted, COURSES) == pytest.approx(3.0 - 2.0 * 1.0)
    assert scalar_reward(RewardSpec(kind="contrast"), COURSES) == pytest.approx(2.5)
    assert scalar_reward(RewardSpec(rois=["broca", "default_mode"]), COURSES) == pytest.approx(2.0)


def test_reward_spec_validation():
    with pytest.raises(ValueError, match="unknown region"):
        RewardSpec(rois=["brocas"])
    with pytest.raises(ValueError, match="names no region"):
        RewardSpec(kind="weighted")
    with pytest.raises(ValueError, match="tr_window"):
        RewardSpec(tr_window=(3, 1))
    with pytest.raises(ValueError, match="selects no TR"):
        scalar_reward(RewardSpec(tr_window=(10, 12)), COURSES)
