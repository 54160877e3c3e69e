"""The procedural phantoms: geometry, intensities, ground-truth attributes and the dataset writer."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hagan.data.phantoms import (
    FIELD_OF_VIEW_MM,
    KINDS,
    RECIPE_FOR_KIND,
    brain_mri,
    phantom_affine,
    thorax_ct,
    write_phantom_dataset,
)
from hagan.errors import HaganError

THORAX_ATTRIBUTES = ["lung_volume_ml", "bone_volume_ml", "body_volume_ml", "emphysema_fraction", "grade", "body_size"]
BRAIN_ATTRIBUTES = ["ventricle_volume_ml", "brain_volume_ml", "intracranial_volume_ml", "grey_matter_volume_ml",
                    "white_matter_volume_ml"]


@pytest.fixture(scope="module")
def thorax64():
    return thorax_ct(64, 7)


def _voxel_ml(kind: str, size: int) -> float:
    return (FIELD_OF_VIEW_MM[kind] / size) ** 3 / 1000.0


def _enclosed_dark(image: np.ndarray, threshold: float = -600.0) -> np.ndarray:
    """Voxels darker than ``threshold`` that are enclosed by the body (lungs and airways, not outside air)."""
    dark = image < threshold
    dark[(image == -1024).all(axis=(1, 2))] = False  # blank padding slices would join inside and outside
    labels, _ = ndimage.label(dark)
    outside = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()]))
    return (labels > 0) & ~np.isin(labels, outside)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("size", [32, 64])
def test_shape_dtype_and_attribute_names(kind, size):
    array, attributes = KINDS[kind](size, 1)
    assert array.shape == (size, size, size)
    assert array.dtype == np.float32
    assert np.isfinite(array).all()
    expected = THORAX_ATTRIBUTES if kind == "thorax-ct" else BRAIN_ATTRIBUTES
    assert list(attributes) == expected
    assert RECIPE_FOR_KIND[kind] in {"ct", "mri"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_same_seed_same_volume_and_different_seeds_differ(kind):
    first, first_attributes = KINDS[kind](32, 3)
    again, again_attributes = KINDS[kind](32, np.random.default_rng(3))
    other, _ = KINDS[kind](32, 4)
    np.testing.assert_array_equal(first, again)
    assert first_attributes == again_attributes
    assert not np.array_equal(first, other)


def test_thorax_hounsfield_ranges(thorax64):
    image, _ = thorax64
    middle = image[24:40]
    corners = np.concatenate([middle[:, :4, :4].ravel(), middle[:, -4:, -4:].ravel()])
    assert abs(float(np.median(corners)) + 1000.0) < 30.0
    interior = image[16:48, 16:48, 12:52]
    lung_like = interior[interior < -500]
    assert lung_like.size > 1000
    assert -950.0 <= float(np.median(lung_like)) <= -750.0
    assert (image > 250).sum() > 200
    assert image.max() < 1500


def test_thorax_keeps_blank_padding_slices(thorax64):
    image, _ = thorax64
    assert (image[0] == -1024).all() and (image[-1] == -1024).all()
    assert image[image.shape[0] // 2].max() > 0


def test_lung_volume_is_measured_from_the_voxels(thorax64):
    image, attributes = thorax64
    voxel_ml = _voxel_ml("thorax-ct", 64)
    lung_voxels = attributes["lung_volume_ml"] / voxel_ml
    assert lung_voxels == pytest.approx(round(lung_voxels), abs=1e-6)
    dark_ml = float(_enclosed_dark(image).sum()) * voxel_ml
    assert dark_ml == pytest.approx(attributes["lung_volume_ml"], rel=0.2)
    assert 0 < attributes["bone_volume_ml"] < attributes["body_volume_ml"]
    assert attributes["lung_volume_ml"] < attributes["body_volume_ml"]


def test_larger_lung_and_bone_scales_give_larger_measured_volumes():
    small = thorax_ct(32, 5, lung_scale=0.85, bone_scale=0.8)[1]
    large = thorax_ct(32, 5, lung_scale=1.15, bone_scale=1.2)[1]
    assert large["lung_volume_ml"] > small["lung_volume_ml"] * 1.1
    assert large["bone_volume_ml"] > small["bone_volume_ml"] * 1.1
    assert large["body_volume_ml"] == small["body_volume_ml"]


def test_emphysema_fraction_grows_with_grade():
    fractions = [thorax_ct(32, 11, grade=grade)[1]["emphysema_fraction"] for grade in range(5)]
    assert fractions[0] == 0.0
    assert all(a < b for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] > 0.2


def test_emphysema_darkens_the_lungs():
    healthy, _ = thorax_ct(32, 2, grade=0)
    severe, _ = thorax_ct(32, 2, grade=4)
    healthy_low = (healthy < -950) & _enclosed_dark(healthy)
    severe_low = (severe < -950) & _enclosed_dark(severe)
    assert severe_low.sum() > 2 * healthy_low.sum() + 50


def test_brain_intensities_and_volumes():
    image, attributes = brain_mri(64, 9)
    assert float(np.median(image[:, :4, :4])) < 60.0  # background: Rician noise only
    assert 600.0 < float(np.percentile(image, 99)) < 1300.0
    assert (attributes["brain_volume_ml"] == pytest.approx(
        attributes["grey_matter_volume_ml"] + attributes["white_matter_volume_ml"]))
    assert attributes["ventricle_volume_ml"] > 0
    assert attributes["brain_volume_ml"] + attributes["ventricle_volume_ml"] < attributes["intracranial_volume_ml"]
    assert 900.0 < attributes["intracranial_volume_ml"] < 2500.0


def test_ventricle_scale_override_enlarges_ventricles():
    small = brain_mri(32, 4, ventricle_scale=0.7)[1]
    large = brain_mri(32, 4, ventricle_scale=1.6)[1]
    assert large["ventricle_volume_ml"] > small["ventricle_volume_ml"] * 1.5
    assert large["intracranial_volume_ml"] == small["intracranial_volume_ml"]


def test_bad_requests_are_user_errors(tmp_path):
    with pytest.raises(HaganError, match="unknown phantom parameter"):
        thorax_ct(32, 0, lungs=2)
    with pytest.raises(HaganError, match="grade"):
        thorax_ct(32, 0, grade=5)
    with pytest.raises(HaganError, match="size"):
        brain_mri(8, 0)
    with pytest.raises(HaganError, match="kind"):
        write_phantom_dataset(tmp_path, kind="knee-mri", n=1, size=32)


def test_affine_orientation_and_centre():
    affine = phantom_affine(64, 2.0)
    assert nib.aff2axcodes(affine) == ("S", "A", "R")
    centre = affine @ np.array([31.5, 31.5, 31.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0)


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_write_thorax_dataset_is_stable_in_n(tmp_path):
    three = write_phantom_dataset(tmp_path / "three", n=3, size=32, seed=5)
    five = write_phantom_dataset(tmp_path / "five", n=5, size=32, seed=5)
    rows = _read_csv(five)
    assert five.name == "attributes.csv"
    assert len(rows) == 5 and len(_read_csv(three)) == 3
    assert list(rows[0]) == ["file", *THORAX_ATTRIBUTES]
    assert sorted(int(row["grade"]) for row in rows) == [0, 1, 2, 3, 4]
    assert not list(five.parent.glob(".*"))  # no temporary files left behind
    for row in _read_csv(three):
        small = nib.load(three.parent / row["file"])
        large = nib.load(five.parent / row["file"])
        assert small.get_data_dtype() == np.int16
        assert small.shape == (32, 32, 32)
        assert nib.aff2axcodes(small.affine) == ("S", "A", "R")
        np.testing.assert_array_equal(np.asarray(small.dataobj), np.asarray(large.dataobj))
    assert _read_csv(three) == rows[:3]


def test_write_brain_dataset(tmp_path):
    csv_path = write_phantom_dataset(tmp_path, kind="brain-mri", n=2, size=32, seed=1, progress=True)
    rows = _read_csv(csv_path)
    assert [row["file"] for row in rows] == ["brain-mri_0000.nii.gz", "brain-mri_0001.nii.gz"]
    assert list(rows[0]) == ["file", *BRAIN_ATTRIBUTES]
    image = nib.load(tmp_path / rows[0]["file"])
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.header.get_zooms(), [FIELD_OF_VIEW_MM["brain-mri"] / 32] * 3)
