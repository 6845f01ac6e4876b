"""Hospital-side data handling: readers per format, discovery, labels, preprocessing, splits, partition, synth."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ppcmi.data import (
    Case,
    LabelMap,
    Preprocess,
    discover_cases,
    discover_labels,
    load_arrays,
    load_sample,
    n_slices,
    parse_labels,
    prepare_image,
    read_image,
    read_mask,
    resize_mask,
    scale_intensity,
    split_cases,
    split_from_lists,
    to_color,
)
from ppcmi.experiment import partition, synth
from ppcmi.errors import DataError

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "sunnybrook_lv"
ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"


# ----------------------------------------------------------------------------- fixture writers


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)).save(path)
    return path


def _nifti(path: Path, arr: np.ndarray, zooms: tuple[float, ...] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, np.eye(4))
    if zooms is not None:
        img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def _mha(path: Path, arr_zyx: np.ndarray, spacing_xyz: tuple[float, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))
    return path


def _dicom(path: Path, pixels: np.ndarray, *, z: float, instance: int, slope: float = 1.0, intercept: float = 0.0,
           spacing: tuple[float, float] = (0.8, 0.6), series: str = "1.2.3.4") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    path.parent.mkdir(parents=True, exist_ok=True)
    uid = f"{series}.{instance}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.Modality = MRImageStorage, uid, series, "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing = list(spacing)
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.InstanceNumber = instance
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _open(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def _pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    _png(root / "images" / f"{stem}.png", image)
    _png(root / "masks" / f"{stem}.png", mask)


def _binary_mask(h: int = 6, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[1:4, 2:5] = 1
    return m


def _case(cid: str, group: str, site: str | None = None) -> Case:
    return Case(cid, Path(f"/x/images/{cid}.png"), Path(f"/x/masks/{cid}.png"), None, group, site)


# ----------------------------------------------------------------------------- readers: exact round trips


def test_png_8bit_round_trip(tmp_path):
    a = (np.arange(5 * 7) * 7 % 256).astype(np.uint8).reshape(5, 7)
    p = _png(tmp_path / "a.png", a)
    img, sp = read_image(p)
    assert img.dtype == np.float32 and img.shape == (1, 5, 7) and sp is None
    np.testing.assert_array_equal(img[0], a)
    m, _ = read_mask(p)
    assert m.dtype == np.int64
    np.testing.assert_array_equal(m, a)


def test_png_16bit_round_trip(tmp_path):
    a = (np.arange(4 * 6, dtype=np.uint16) * 2500).reshape(4, 6)
    p = _png(tmp_path / "a.png", a)
    assert _open(p)[0].startswith("I")
    img, _ = read_image(p)
    np.testing.assert_array_equal(img[0], a.astype(np.float32))
    assert img.max() == 23 * 2500


def test_rgb_and_rgba_png(tmp_path):
    a = (np.arange(3 * 4 * 3) * 5).astype(np.uint8).reshape(3, 4, 3)
    img, _ = read_image(_png(tmp_path / "rgb.png", a))
    assert img.shape == (3, 3, 4)
    np.testing.assert_array_equal(img, a.transpose(2, 0, 1))
    rgba = np.concatenate([a, np.full((3, 4, 1), 128, np.uint8)], axis=2)
    img, _ = read_image(_png(tmp_path / "rgba.png", rgba))
    np.testing.assert_array_equal(img, a.transpose(2, 0, 1))


def test_palette_png_image_to_rgb_mask_keeps_indices(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    im = Image.new("P", (3, 2))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata(idx.flatten().tolist())
    p = tmp_path / "pal.png"
    im.save(p)
    assert _open(p)[0] == "P"
    m, _ = read_mask(p)
    np.testing.assert_array_equal(m, idx)
    img, _ = read_image(p)
    assert img.shape == (3, 2, 3)
    np.testing.assert_array_equal(img[0], np.where(idx == 1, 255, 0))  # red channel
    np.testing.assert_array_equal(img[2], np.where(idx == 2, 255, 0))  # blue channel


def test_tiff_float_and_jpeg(tmp_path):
    a = (np.arange(5 * 6, dtype=np.float32) * 1.5 - 10).reshape(5, 6)
    p = tmp_path / "a.tif"
    Image.fromarray(a).save(p)
    img, _ = read_image(p)
    np.testing.assert_array_equal(img[0], a)
    g = np.tile(np.linspace(0, 255, 16), (12, 1)).astype(np.uint8)
    p = tmp_path / "a.jpg"
    Image.fromarray(g).save(p, quality=100)
    img, _ = read_image(p)
    assert img.shape == (1, 12, 16)
    assert np.abs(img[0] - g).max() <= 3  # lossy, but orientation and scale preserved


def test_nifti_3d_slices_orientation_and_spacing(tmp_path):
    a = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)  # (i, j, k)
    p = _nifti(tmp_path / "v.nii.gz", a, zooms=(0.5, 0.7, 2.0))
    for k in range(3):
        img, sp = read_image(p, k)
        assert img.shape == (1, 5, 4)
        np.testing.assert_array_equal(img[0], a[:, :, k].T)
        assert sp == pytest.approx((0.7, 0.5))
        m, msp = read_mask(p, k)
        np.testing.assert_array_equal(m, a[:, :, k].T)
        assert msp == sp
    assert n_slices(p) == 3
    with pytest.raises(DataError, match="slice index is needed"):
        read_image(p)
    with pytest.raises(DataError, match="out of range"):
        read_image(p, 3)


def test_nifti_singleton_third_axis_is_2d(tmp_path):
    a = np.arange(3 * 4, dtype=np.uint8).reshape(3, 4, 1)
    root = tmp_path / "ds"
    _nifti(root / "images" / "x.nii", a.astype(np.float32))
    _nifti(root / "masks" / "x.nii.gz", (a % 2).astype(np.uint8))
    (case,) = discover_cases(root)
    assert case.case_id == "x" and case.slice_index is None and n_slices(case.image_path) is None
    img, _ = read_image(case.image_path)
    np.testing.assert_array_equal(img[0], a[:, :, 0].T)


@pytest.mark.parametrize("ext", [".mha", ".mhd"])
def test_itk_volume_round_trip(tmp_path, ext):
    a = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # (z, y, x)
    p = _mha(tmp_path / f"v{ext}", a, (0.6, 0.9, 3.0))
    for k in range(3):
        img, sp = read_image(p, k)
        np.testing.assert_array_equal(img[0], a[k])
        assert sp == pytest.approx((0.9, 0.6))
    m, _ = read_mask(p, 2)
    np.testing.assert_array_equal(m, a[2])


def _dicom_series(folder: Path) -> list[np.ndarray]:
    """Three slices written out of order: files a.dcm (z=10), b (z=0, no extension), c.dcm (z=5)."""
    planes = [(np.arange(4 * 5, dtype=np.uint16).reshape(4, 5) + 100 * k) for k in range(3)]
    _dicom(folder / "a.dcm", planes[2], z=10.0, instance=1, slope=2.0, intercept=-100.0)
    _dicom(folder / "b", planes[0], z=0.0, instance=3, slope=2.0, intercept=-100.0)
    _dicom(folder / "c.dcm", planes[1], z=5.0, instance=2, slope=2.0, intercept=-100.0)
    (folder / "notes.txt").write_text("not dicom")
    return planes


def test_dicom_series_sorted_rescaled_with_spacing(tmp_path):
    planes = _dicom_series(tmp_path / "series")
    for k in range(3):
        img, sp = read_image(tmp_path / "series", k)
        np.testing.assert_array_equal(img[0], planes[k].astype(np.float32) * 2 - 100)
        assert sp == pytest.approx((0.8, 0.6))
    assert n_slices(tmp_path / "series") == 3


def test_single_dicom_file_is_2d(tmp_path):
    a = np.arange(3 * 6, dtype=np.uint16).reshape(3, 6)
    p = _dicom(tmp_path / "one.dcm", a, z=0.0, instance=1, intercept=5.0)
    img, sp = read_image(p)
    np.testing.assert_array_equal(img[0], a + 5.0)
    assert sp == pytest.approx((0.8, 0.6))
    m, _ = read_mask(p)  # masks are not rescaled
    np.testing.assert_array_equal(m, a)


def test_dicom_series_with_nifti_mask_discovered_per_slice(tmp_path):
    root = tmp_path / "ds"
    planes = _dicom_series(root / "images" / "pat1")
    mask = np.zeros((5, 4, 3), np.uint8)  # (i, j, k): slices read back as (4, 5)
    mask[1:3, 1:3, :] = 1
    _nifti(root / "masks" / "pat1.nii.gz", mask)
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["pat1_z000", "pat1_z001", "pat1_z002"]
    assert {c.group for c in cases} == {"pat1"}
    s = load_sample(cases[1], Preprocess(size=4, intensity="minmax"), LabelMap((0, 1)))
    assert s.original_shape == planes[1].shape and s.image.shape == (1, 4, 4)
    # the 4x5 plane keeps its aspect: 5 columns -> 4, 4 rows -> round(3.2) = 3 (and a padded row)
    assert s.geometry.scaled == (3, 4) and s.geometry.pad == (0, 1, 0, 0)
    assert s.spacing == pytest.approx((0.8 * 4 / 3, 0.6 * 5 / 4))
    assert s.native_spacing == pytest.approx((0.8, 0.6)) and np.array_equal(s.native_mask, mask[:, :, 1].T)


# ----------------------------------------------------------------------------- reader errors


def test_truncated_png_names_the_file(tmp_path):
    p = _png(tmp_path / "full.png", (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    data = p.read_bytes()
    bad = tmp_path / "broken.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="broken.png: cannot read image") as e:
        read_image(bad)
    assert "\n" not in str(e.value)


def test_missing_file_and_colour_mask(tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    rgb = np.zeros((3, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    with pytest.raises(DataError, match="colour mask"):
        read_mask(_png(tmp_path / "c.png", rgb))


# ----------------------------------------------------------------------------- discovery


def test_discover_pairs_sorted_ignores_unknown_and_warns_on_orphan_mask(tmp_path, caplog):
    root = tmp_path / "ds"
    for stem in ["b2", "a1", "c3"]:
        _pair(root, stem, np.zeros((6, 8), np.uint8), _binary_mask())
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "images" / "d4.tif")  # image .tif, mask .png
    _png(root / "masks" / "d4.png", _binary_mask())
    (root / "images" / "README.txt").write_text("ignored")
    _png(root / "masks" / "orphan.png", _binary_mask())
    with caplog.at_level(logging.WARNING, logger="ppcmi.data"):
        cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["a1", "b2", "c3", "d4"]
    assert [c.group for c in cases] == ["a1", "b2", "c3", "d4"]
    assert cases[3].image_path.suffix == ".tif" and cases[3].mask_path.suffix == ".png"
    assert all(c.slice_index is None and c.site is None for c in cases)
    assert "orphan.png" in caplog.text


def test_discover_group_regex(tmp_path):
    root = tmp_path / "ds"
    for stem in ["P01_s1", "P01_s2", "P02_s1"]:
        _pair(root, stem, np.zeros((6, 8), np.uint8), _binary_mask())
    cases = discover_cases(root, group_regex=r"^(P\d+)_")
    assert [c.group for c in cases] == ["P01", "P01", "P02"]
    assert [c.group for c in discover_cases(root, group_regex=r"P\d+")] == ["P01", "P01", "P02"]  # whole match
    with pytest.raises(DataError, match="P01_s1.png.*does not match"):
        discover_cases(root, group_regex=r"^Q")


def test_discover_volume_regex_names_the_volume_of_each_2d_plane(tmp_path):
    root = tmp_path / "ds"
    for stem in ["patient001_frame01_slice_1", "patient001_frame01_slice_2", "patient001_frame12_slice_1"]:
        _pair(root, stem, np.zeros((6, 8), np.uint8), _binary_mask())
    assert [c.volume for c in discover_cases(root)] == [None, None, None]  # 2D files name no volume by themselves
    cases = discover_cases(root, group_regex=r"^(patient\d+)_", volume_regex=r"^(patient\d+_frame\d+)_")
    assert [c.volume for c in cases] == ["patient001_frame01", "patient001_frame01", "patient001_frame12"]
    assert [c.group for c in cases] == ["patient001"] * 3 and all(c.slice_index is None for c in cases)
    with pytest.raises(DataError, match=r"patient001_frame01_slice_1.png: stem 'patient001_frame01_slice_1' does not "
                                        r"match volume_regex '\^study'"):
        discover_cases(root, volume_regex=r"^study")
    with pytest.raises(DataError, match=r"^volume_regex: invalid regular expression '\('"):
        discover_cases(root, volume_regex="(")


def test_the_planes_of_a_volume_stored_a_slice_per_file_are_scored_together(tmp_path):
    from types import SimpleNamespace

    from ppcmi.data import LabelMap
    from ppcmi.simulate import volume_rows

    root = tmp_path / "ds"
    for stem in ["v1_s1", "v1_s2", "v2_s1"]:
        _pair(root, stem, np.zeros((6, 8), np.uint8), _binary_mask())
    cases = discover_cases(root, volume_regex=r"^(v\d+)_")
    gt = [np.zeros((6, 8), np.int64) for _ in cases]
    gt[0][0, :2] = 1  # v1: 2 true pixels, on its first plane
    pred = [g.copy() for g in gt]
    pred[1][5, :2] = 1  # v1: and 2 false ones on its second; v2: both empty
    rows = volume_rows({"h1": pred}, {"native_masks": gt}, SimpleNamespace(test=cases, labels=LabelMap((0, 1), ("bg", "x"))))
    assert [(r["volume"], r["n_planes"]) for r in rows] == [("v1", 2), ("v2", 1)]
    assert rows[0]["x_dice"] == pytest.approx(2 * 2 / (4 + 2)) and rows[1]["x_dice"] == 1.0  # 2|P and G| / (|P| + |G|)


def test_discover_group_csv(tmp_path):
    root = tmp_path / "ds"
    for stem in ["a", "b", "c"]:
        _pair(root, stem, np.zeros((6, 8), np.uint8), _binary_mask())
    (root / "groups.csv").write_text("case,group,site\na,p1,siteA\nb,p1,siteA\nc,p2,siteB\n")
    cases = discover_cases(root, group_csv="groups.csv")  # relative: found in root
    assert [(c.group, c.site) for c in cases] == [("p1", "siteA"), ("p1", "siteA"), ("p2", "siteB")]
    (root / "short.csv").write_text("case,group\na,p1\nb,p1\n")
    with pytest.raises(DataError, match="c.png: case 'c' is missing from the group CSV"):
        discover_cases(root, group_csv=root / "short.csv")
    (root / "bad.csv").write_text("name,patient\na,p1\n")
    with pytest.raises(DataError, match="bad.csv: group CSV needs the columns"):
        discover_cases(root, group_csv=root / "bad.csv")


def test_discover_3d_nifti_pairs_give_one_case_per_slice(tmp_path):
    root = tmp_path / "ds"
    vol = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    _nifti(root / "images" / "vol.nii.gz", vol, zooms=(1.0, 1.5, 5.0))
    _nifti(root / "masks" / "vol.nii.gz", (vol % 3).astype(np.uint8))
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["vol_z000", "vol_z001", "vol_z002"]
    assert [c.slice_index for c in cases] == [0, 1, 2] and {c.group for c in cases} == {"vol"}
    arr = load_arrays(cases, Preprocess(size=10), LabelMap((0, 1, 2)), native=True)
    assert arr["images"].shape == (3, 1, 10, 10) and arr["masks"].shape == (3, 10, 10)
    # 5x4 planes keep their aspect: rows 5 -> 10, columns 4 -> 8, one padded column each side
    assert arr["geometries"][0].scaled == (10, 8) and arr["geometries"][0].pad == (0, 0, 1, 1)
    assert arr["spacings"][0] == pytest.approx((1.5 * 5 / 10, 1.0 * 4 / 8))
    assert arr["native_spacings"] == [pytest.approx((1.5, 1.0))] * 3
    assert [m.tolist() for m in arr["native_masks"]] == [(vol[:, :, k] % 3).T.tolist() for k in range(3)]
    assert arr["original_shapes"] == [(5, 4)] * 3 and arr["case_ids"] == [c.case_id for c in cases]


def test_discover_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "missing")
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(DataError, match="images: folder is missing"):
        discover_cases(root)
    (root / "images").mkdir()
    with pytest.raises(DataError, match="masks: folder is missing"):
        discover_cases(root)
    (root / "masks").mkdir()
    (root / "images" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        discover_cases(root)
    _png(root / "images" / "lonely.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="lonely.png: no mask found") as e:
        discover_cases(root)
    assert "\n" not in str(e.value)
    _nifti(root / "masks" / "lonely.nii", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="image is 2D but mask is 3 slices"):
        discover_cases(root)


# ----------------------------------------------------------------------------- load_sample errors


def test_image_and_mask_sizes_differ(tmp_path):
    root = tmp_path / "ds"
    _pair(root, "x", np.zeros((6, 8), np.uint8), np.zeros((6, 7), np.uint8))
    (case,) = discover_cases(root)
    with pytest.raises(DataError, match=r"images/x.png and .*masks/x.png.*6x8 but mask is 6x7"):
        load_sample(case, Preprocess(size=8), LabelMap((0, 1)))


def test_unknown_label_value_names_the_mask(tmp_path):
    root = tmp_path / "ds"
    m = _binary_mask()
    m[0, 0] = 7
    _pair(root, "odd", np.zeros((6, 8), np.uint8), m)
    (case,) = discover_cases(root)
    with pytest.raises(DataError, match=r"masks/odd.png: mask has label values \[7\] outside the mapping \(0, 1\)"):
        load_sample(case, Preprocess(size=8), LabelMap((0, 1)))


def test_nan_in_nifti_image(tmp_path):
    root = tmp_path / "ds"
    vol = np.ones((4, 4, 2), np.float32)
    vol[1, 2, 1] = np.nan
    _nifti(root / "images" / "ct.nii.gz", vol)
    _nifti(root / "masks" / "ct.nii.gz", np.zeros((4, 4, 2), np.uint8))
    c0, c1 = discover_cases(root)
    load_sample(c0, Preprocess(size=4), LabelMap((0, 1)))  # slice 0 is clean
    with pytest.raises(DataError, match=r"images/ct.nii.gz \(slice 1\): image has 1 NaN/Inf"):
        load_sample(c1, Preprocess(size=4), LabelMap((0, 1)))


# ----------------------------------------------------------------------------- labels


def test_label_map_to_index():
    lm = LabelMap((0, 255))
    assert lm.names == ("background", "class1") and lm.n_classes == 2
    np.testing.assert_array_equal(lm.to_index(np.array([[0, 255], [255, 0]]), "m"), [[0, 1], [1, 0]])
    lm = LabelMap((0, 200, 100), ("bg", "a", "b"))  # order is the class order, not sorted
    out = lm.to_index(np.array([0, 100, 200, 100]), "m")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [0, 2, 1, 2])
    with pytest.raises(DataError, match=r"src.png: mask has label values \[3, 300\]"):
        lm.to_index(np.array([0, 3, 300]), "src.png")
    with pytest.raises(DataError):
        LabelMap((0, 1), ("only-one",))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-5, 300), min_size=2, max_size=6, unique=True), st.integers(0, 2**31 - 1))
def test_to_index_inverts_values(values, seed):
    lm = LabelMap(tuple(values))
    idx = np.random.default_rng(seed).integers(0, len(values), (5, 7))
    raw = np.asarray(values)[idx]
    np.testing.assert_array_equal(lm.to_index(raw, "m"), idx)


def test_parse_labels():
    assert parse_labels(None) is None and parse_labels("  ") is None
    lm = parse_labels("0, 1,2", "bg,ps,fh")
    assert lm == LabelMap((0, 1, 2), ("bg", "ps", "fh"))
    assert parse_labels("0,255").names == ("background", "class1")
    for bad in ["0,x", "0", "1,1", "0,,2"]:
        with pytest.raises(DataError, match="--labels"):
            parse_labels(bad)
    with pytest.raises(DataError, match="--class-names"):
        parse_labels("0,1", "a,b,c")


def test_discover_labels(tmp_path):
    root = tmp_path / "ds"
    m1, m2 = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    m1[0, 0], m2[1, 1] = 2, 5
    _pair(root, "a", np.zeros((4, 4), np.uint8), m1)
    _pair(root, "b", np.zeros((4, 4), np.uint8), m2)
    assert discover_labels(discover_cases(root)).values == (0, 2, 5)
    empty = tmp_path / "empty"
    _pair(empty, "a", np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="only the value"):
        discover_labels(discover_cases(empty))


# ----------------------------------------------------------------------------- preprocessing


def test_minmax_scaling_and_constant_image():
    x = np.array([[[0.0, 2.0], [4.0, 6.0]]], np.float32)
    np.testing.assert_allclose(scale_intensity(x, Preprocess()), [[[0, 1 / 3], [2 / 3, 1]]], rtol=1e-6)
    np.testing.assert_array_equal(scale_intensity(np.full((1, 3, 3), 7.0, np.float32), Preprocess()), 0.0)


def test_percentile_scaling():
    x = np.arange(101, dtype=np.float32).reshape(1, 1, 101)  # percentile p is exactly p
    y = scale_intensity(x, Preprocess(intensity="percentile", percentiles=(10, 90)))
    expected = (np.clip(np.arange(101), 10, 90) - 10) / 80
    np.testing.assert_allclose(y[0, 0], expected, atol=1e-6)
    assert y[0, 0, 50] == pytest.approx(0.5)


def test_window_scaling_with_offset():
    x = np.array([[[0.0, 1024.0, 2048.0, 24.0, 1524.0]]], np.float32)  # CT stored as HU + 1024
    y = scale_intensity(x, Preprocess(intensity="window", window=(-1000, 1000), offset=1024))
    np.testing.assert_allclose(y[0, 0], [0.0, 0.5, 1.0, 0.0, 0.75], atol=1e-6)
    with pytest.raises(DataError, match="window"):
        Preprocess(intensity="window")


def test_color_conversion():
    rgb = np.stack([np.full((2, 2), 100.0), np.full((2, 2), 50.0), np.full((2, 2), 10.0)]).astype(np.float32)
    gray = to_color(rgb, "gray")
    assert gray.shape == (1, 2, 2)
    np.testing.assert_allclose(gray, 0.299 * 100 + 0.587 * 50 + 0.114 * 10, rtol=1e-6)
    g = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    np.testing.assert_array_equal(to_color(g, "rgb"), np.repeat(g, 3, axis=0))


def test_resize_shapes_and_nearest_mask():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1000, (1, 40, 30)).astype(np.float32)
    out = prepare_image(img, Preprocess(size=16))
    assert out.shape == (1, 16, 16) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    up = prepare_image(img[:, :5, :5], Preprocess(size=64, color="rgb"))
    assert up.shape == (3, 64, 64)
    m = rng.choice([0, 3, 7], size=(37, 23))
    r = resize_mask(m, 16)
    assert r.shape == (16, 16) and set(np.unique(r)) <= {0, 3, 7}
    small = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(resize_mask(small, 4), np.kron(small, np.ones((2, 2), int)))
    np.testing.assert_array_equal(resize_mask(np.kron(small, np.ones((2, 2), int)), 2), small)
    np.testing.assert_array_equal(resize_mask(small, (2, 6)), np.kron(small, np.ones((1, 3), int)))


def test_load_sample_png(tmp_path):
    root = tmp_path / "ds"
    img = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20)
    m = np.zeros((30, 20), np.uint8)
    m[5:20, 4:15], m[8:12, 6:10] = 128, 255
    _pair(root, "x", img, m)
    (case,) = discover_cases(root)
    s = load_sample(case, Preprocess(size=16), LabelMap((0, 128, 255)))
    assert s.image.shape == (1, 16, 16) and s.image.dtype == np.float32
    assert 0.0 <= s.image.min() < 0.05 and 0.95 < s.image.max() <= 1.0
    assert s.mask.dtype == np.int64 and set(np.unique(s.mask)) == {0, 1, 2}
    assert s.original_shape == (30, 20) and s.spacing is None and s.case_id == s.group == "x"


# ----------------------------------------------------------------------------- splits


def _many_cases(n_groups: int = 10, per: int = 3) -> list[Case]:
    return [_case(f"g{g:02d}_s{s}", f"g{g:02d}") for g in range(n_groups) for s in range(per)]


def test_split_cases_patient_disjoint_and_deterministic():
    cases = _many_cases()
    sp = split_cases(cases, val_frac=0.2, test_frac=0.2, seed=3)
    groups = {k: {c.group for c in v} for k, v in sp.items()}
    assert len(groups["val"]) == 2 and len(groups["test"]) == 2 and len(groups["train"]) == 6
    assert all(not (groups[a] & groups[b]) for a, b in [("train", "val"), ("train", "test"), ("val", "test")])
    assert sorted(c.case_id for v in sp.values() for c in v) == sorted(c.case_id for c in cases)
    assert split_cases(list(reversed(cases)), val_frac=0.2, test_frac=0.2, seed=3) == sp
    assert any(split_cases(cases, seed=s)["test"] != sp["test"] for s in range(4, 10))


def test_split_cases_small_and_by_case():
    sp = split_cases(_many_cases(3, 2), val_frac=0.1, test_frac=0.1, seed=0)
    assert [len({c.group for c in sp[k]}) for k in ("train", "val", "test")] == [1, 1, 1]
    sp = split_cases(_many_cases(3, 2), val_frac=0.0, test_frac=0.3, seed=0)
    assert sp["val"] == [] and len({c.group for c in sp["test"]}) == 1
    sp = split_cases(_many_cases(2, 10), val_frac=0.25, test_frac=0.25, seed=1, by_group=False)
    assert (len(sp["train"]), len(sp["val"]), len(sp["test"])) == (10, 5, 5)
    with pytest.raises(DataError, match="val_frac"):
        split_cases(_many_cases(), val_frac=0.6, test_frac=0.5)


def test_split_from_lists_fake(tmp_path):
    ids = ["p1_frame01_slice_1", "p1_frame01_slice_2", "p1_frame02_slice_1", "p10_frame01_slice_1",
           "p2_frame01_slice_1", "p3_frame01_slice_1"]
    cases = [_case(i, i.split("_")[0]) for i in ids]
    (tmp_path / "train.list").write_text("p1_frame01\np1_frame02\n\n")
    (tmp_path / "val.list").write_text("p2_frame01_slice_1\n")
    (tmp_path / "test.list").write_text("p10_frame01\n")
    sp = split_from_lists(cases, {k: tmp_path / f"{k}.list" for k in ("train", "val", "test")})
    assert [c.case_id for c in sp["train"]] == ids[:3]  # "p1_frame01" does not capture "p10_..."
    assert [c.case_id for c in sp["val"]] == ["p2_frame01_slice_1"]
    assert [c.case_id for c in sp["test"]] == ["p10_frame01_slice_1"]  # p3 is in no list: dropped
    (tmp_path / "clash.list").write_text("p1_frame01_slice_2\n")
    with pytest.raises(DataError, match="p1_frame01_slice_2"):
        split_from_lists(cases, {"train": tmp_path / "train.list", "test": tmp_path / "clash.list"})
    with pytest.raises(DataError, match="missing.list"):
        split_from_lists(cases, {"train": tmp_path / "missing.list"})


def test_split_from_lists_real_acdc():
    if not (ACDC / "images").is_dir():
        pytest.skip(f"ACDC not available at {ACDC}")
    cases = discover_cases(ACDC, group_regex=r"^(patient\d+)_")
    sp = split_from_lists(cases, {k: ACDC / f"{k}.list" for k in ("train", "val", "test")})
    groups = {k: {c.group for c in v} for k, v in sp.items()}
    assert all(groups.values())
    assert all(not (groups[a] & groups[b]) for a, b in [("train", "val"), ("train", "test"), ("val", "test")])
    assert (len(groups["train"]), len(groups["val"]), len(groups["test"])) == (70, 10, 20)


# ----------------------------------------------------------------------------- partition


def test_partition_iid_and_group():
    cases = [_case(f"g{g}_s{s}", f"g{g}") for g, n in enumerate([6, 1, 2, 3, 4, 2]) for s in range(n)]
    parts = partition(cases, 3, mode="iid", seed=0)
    assert sorted(len(p) for p in parts) == [6, 6, 6]
    assert sorted(c.case_id for p in parts for c in p) == sorted(c.case_id for c in cases)
    parts = partition(cases, 3, mode="group", seed=0)
    assert sorted(len(p) for p in parts) == [6, 6, 6]  # 6 | 4+2 | 3+2+1
    owner = {}
    for k, p in enumerate(parts):
        for c in p:
            assert owner.setdefault(c.group, k) == k  # a group never spans two sites
    assert partition(cases, 3, mode="group", seed=0) == parts
    with pytest.raises(DataError, match="6 groups cannot fill 7 sites"):
        partition(cases, 7, mode="group")
    with pytest.raises(DataError, match="n_sites"):
        partition(cases, 0)
    with pytest.raises(DataError, match="partition"):
        partition(cases, 2, mode="other")


def test_partition_site():
    cases = [_case("a", "p1", "siteB"), _case("b", "p2", "siteA"), _case("c", "p3", "siteB")]
    parts = partition(cases, 2, mode="site")
    assert [[c.case_id for c in p] for p in parts] == [["b"], ["a", "c"]]
    with pytest.raises(DataError, match="2 site labels"):
        partition(cases, 3, mode="site")
    with pytest.raises(DataError, match="no site label"):
        partition(cases + [_case("d", "p4")], 2, mode="site")


# ----------------------------------------------------------------------------- synth


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_layout_determinism_and_refusal(tmp_path):
    kw = dict(sites=2, patients_per_site=2, slices_per_patient=3, size=48, n_classes=3)
    out = synth(tmp_path / "a", seed=5, **kw)
    imgs = sorted(p.name for p in (out / "images").iterdir())
    assert len(imgs) == 12 and imgs[0] == "site1_p01_s00.png" and imgs[-1] == "site2_p02_s02.png"
    assert sorted(p.name for p in (out / "masks").iterdir()) == imgs
    assert (out / "README.md").is_file()
    lines = (out / "groups.csv").read_text().splitlines()
    assert lines[0] == "case,group,site" and "site2_p01_s02,site2_p01,site2" in lines
    assert _tree_bytes(out) == _tree_bytes(synth(tmp_path / "b", seed=5, **kw))
    assert _tree_bytes(out) != _tree_bytes(synth(tmp_path / "c", seed=6, **kw))
    with pytest.raises(DataError, match="refusing to overwrite"):
        synth(out, seed=5, **kw)
    synth(out, seed=6, overwrite=True, **kw)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "c")

    cases = discover_cases(out, group_csv=out / "groups.csv")
    assert len(cases) == 12 and len({c.group for c in cases}) == 4 and {c.site for c in cases} == {"site1", "site2"}
    assert discover_labels(cases).values == (0, 1, 2)
    assert [len(p) for p in partition(cases, 2, mode="site")] == [6, 6]


def test_synth_classes_are_separable(tmp_path):
    out = synth(tmp_path / "s", sites=3, patients_per_site=1, slices_per_patient=2, size=64, n_classes=4, seed=1)
    for p in sorted((out / "images").iterdir()):
        img = _open(p)[1].astype(np.float64)
        lab = _open(out / "masks" / p.name)[1]
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        assert (lab == 1).mean() > 0.05  # the ellipse is large
        means = [img[lab == k].mean() for k in range(4)]
        stds = [img[lab == k].std() for k in range(4)]
        assert all(b - a > 2 * max(stds) for a, b in zip(means, means[1:])), (p.name, means, stds)


# ----------------------------------------------------------------------------- bundled real data


def test_bundled_sunnybrook():
    if not (BUNDLED / "images").is_dir():
        pytest.skip(f"bundled dataset missing at {BUNDLED}")
    cases = discover_cases(BUNDLED, group_regex=r"^(SCD\d+)_")
    assert len(cases) == 96 and len({c.group for c in cases}) == 5
    labels = discover_labels(cases)
    assert labels.values == (0, 1)
    s = load_sample(cases[0], Preprocess(size=64, intensity="percentile"), labels)
    assert s.image.shape == (1, 64, 64) and s.image.dtype == np.float32
    assert s.image.min() >= 0.0 and s.image.max() <= 1.0 and s.image.max() > 0.5
    assert set(np.unique(s.mask)) == {0, 1} and s.original_shape == (256, 256)


def test_center_crop_and_restore_round_trip():
    from ppcmi.data import Preprocess, center_crop, crop_box, forward_mask, plane_geometry, prepare_image, restore_labels

    assert crop_box(256, 256, 0.5) == (64, 64, 128, 128)
    assert crop_box(7, 10, 0.5) == (1, 2, 4, 5)  # rows round(3.5) = 4 (to even), top (7-4)//2 = 1; cols 5, left 2
    lab = np.zeros((256, 256), np.int64)
    lab[100:150, 110:140] = 2
    small = center_crop(lab, 0.5)  # 128x128: no resampling needed
    assert small.shape == (128, 128) and small.sum() == lab.sum()
    g = plane_geometry((256, 256), Preprocess(size=128, crop=0.5))
    assert np.array_equal(forward_mask(lab, g), small)
    one_hot = np.eye(3, dtype=np.float32)[small].transpose(2, 0, 1)[None]
    assert np.array_equal(restore_labels(one_hot, [g])[0], lab)
    # with a resize in between: back to the original grid from probabilities, background outside the crop
    g64 = plane_geometry((256, 256), Preprocess(size=64, crop=0.5))
    back = restore_labels(np.eye(3, dtype=np.float32)[forward_mask(lab, g64)].transpose(2, 0, 1)[None], [g64])[0]
    assert back.shape == (256, 256) and back[:64].sum() == 0 and back[:, :64].sum() == 0
    assert (back == lab).mean() > 0.99
    img = np.arange(256 * 256, dtype=np.float32).reshape(1, 256, 256)
    x = prepare_image(img, Preprocess(size=128, crop=0.5))
    ref = img[:, 64:192, 64:192]
    assert np.allclose(x, (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)
    with pytest.raises(DataError, match="data.crop"):
        Preprocess(crop=0.0)


# ----------------------------------------------------------------------------- nnU-Net raw dataset layout


def _nnunet_v2(root: Path, *, channels: int = 2, ending: str = ".nii.gz") -> dict[str, np.ndarray]:
    """imagesTr/CASE_000k + labelsTr/CASE (3D NIfTI, 3 slices), imagesTs/t1_000k; returns the masks (i, j, k)."""
    import json

    rng = np.random.default_rng(5)
    masks = {}
    for case in ("ca", "cb"):
        m = np.zeros((6, 5, 3), np.uint8)
        m[1:4, 2:4, 1:] = 1
        m[4, 0, :] = 3
        masks[case] = m
        _nifti(root / "labelsTr" / f"{case}{ending}", m)
        for c in range(channels):
            _nifti(root / "imagesTr" / f"{case}_{c:04d}{ending}", (rng.normal(size=(6, 5, 3)) + 10 * c).astype(np.float32))
    for c in range(channels):
        _nifti(root / "imagesTs" / f"t1_{c:04d}{ending}", rng.normal(size=(6, 5, 3)).astype(np.float32))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): name for c, name in enumerate(["T2", "ADC"][:channels])},
        "labels": {"background": 0, "zone": 1, "lesion": 3}, "numTraining": 2, "file_ending": ending}))
    return masks


def test_nnunet_v2_channels_labels_and_info(tmp_path):
    from ppcmi.data import dataset_info, nnunet_test_images

    root = tmp_path / "Dataset001_Prostate"
    masks = _nnunet_v2(root)
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == [f"{s}_z{k:03d}" for s in ("ca", "cb") for k in range(3)]
    c = cases[4]
    assert c.image_paths == (root / "imagesTr" / "cb_0000.nii.gz", root / "imagesTr" / "cb_0001.nii.gz")
    assert c.image_path == c.image_paths[0] and c.mask_path == root / "labelsTr" / "cb.nii.gz" and c.group == "cb"
    img, _ = read_image(c.image_source, c.slice_index)
    assert img.shape == (2, 5, 6)
    assert abs(float(img[1].mean()) - 10.0) < 1.5 and abs(float(img[0].mean())) < 1.5  # channel order kept
    m, _ = read_mask(c.mask_path, c.slice_index)
    np.testing.assert_array_equal(m, masks["cb"][:, :, 1].T)
    lmap = discover_labels(cases)
    assert lmap == LabelMap((0, 1, 3), ("background", "zone", "lesion"))
    with pytest.raises(DataError, match=r"cb_0000\.nii\.gz \(slice 1\): image has 2 channels; the networks take 1"):
        load_sample(c, Preprocess(size=4, intensity="minmax"), lmap)
    info = dataset_info(root)
    assert info == {"layout": "nnunet", "version": 2, "name": None, "modalities": ["T2", "ADC"], "channels": 2,
                    "labels": {"values": [0, 1, 3], "names": ["background", "zone", "lesion"]},
                    "file_ending": ".nii.gz", "num_training": 2, "num_test": 1}
    assert nnunet_test_images(root) == [("t1", (root / "imagesTs" / "t1_0000.nii.gz", root / "imagesTs" / "t1_0001.nii.gz"))]


def test_nnunet_v2_errors(tmp_path):
    import json

    root = tmp_path / "ds"
    _nnunet_v2(root)
    (root / "imagesTr" / "cb_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTr: case 'cb' has 1 channel files .* declares 2 channels"):
        discover_cases(root)
    (root / "imagesTr" / "cb_0000.nii.gz").unlink()
    with pytest.raises(DataError, match=r"cb\.nii\.gz: no image for this label"):
        discover_cases(root)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "both": [1, 3]}}))
    with pytest.raises(DataError, match="region-based labels are not supported"):
        discover_cases(root)
    root2 = tmp_path / "ds2"
    _nnunet_v2(root2)
    (root2 / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "zone": 1}}))
    with pytest.raises(DataError, match=r"masks hold the values \[3\] that dataset.json 'labels' \(0, 1\) does not declare"):
        discover_labels(discover_cases(root2))


def test_nnunet_v1_msd_layout_4d_channels_without_suffix(tmp_path, caplog):
    """MSD: modality + labels index -> name, a training list with ./ paths, 4D NIfTI images (channels last)."""
    import json

    from ppcmi.data import dataset_info, nnunet_test_images

    root = tmp_path / "Task05_Prostate"
    img = np.stack([np.full((6, 5, 3), 1.0, np.float32), np.full((6, 5, 3), 7.0, np.float32)], axis=-1)
    img[2, 1, 0, 1] = 9.0  # voxel (i=2, j=1, k=0) of channel 1
    for case in ("prostate_00", "prostate_01", "prostate_02"):
        _nifti(root / "imagesTr" / f"{case}.nii.gz", img)
        _nifti(root / "labelsTr" / f"{case}.nii.gz", (np.arange(6 * 5 * 3).reshape(6, 5, 3) % 3).astype(np.float32))
    _nifti(root / "imagesTs" / "prostate_07.nii.gz", img)
    (root / "dataset.json").write_text(json.dumps({
        "name": "PROSTATE", "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": 3, "numTest": 1,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("prostate_00", "prostate_02")],
        "test": ["./imagesTs/prostate_07.nii.gz"]}))
    with caplog.at_level(logging.WARNING):
        cases = discover_cases(root)
    assert "not listed in dataset.json 'training'" in caplog.text and "numTraining is 3 but 2" in caplog.text
    assert sorted({c.group for c in cases}) == ["prostate_00", "prostate_02"]
    c = cases[0]
    assert c.image_paths == () and c.slice_index == 0
    x, _ = read_image(c.image_source, 0)
    assert x.shape == (2, 5, 6) and x[1, 1, 2] == 9.0 and x[0].max() == 1.0
    assert discover_labels(cases) == LabelMap((0, 1, 2), ("background", "PZ", "TZ"))
    info = dataset_info(root)
    assert (info["version"], info["name"], info["modalities"], info["channels"], info["num_training"], info["num_test"]) == \
        (1, "PROSTATE", ["T2", "ADC"], 2, 2, 1)
    assert nnunet_test_images(root) == [("prostate_07", (root / "imagesTs" / "prostate_07.nii.gz",))]


def test_dataset_info_images_masks_layout(tmp_path):
    from ppcmi.data import dataset_info

    root = tmp_path / "ds"
    _pair(root, "a", np.zeros((6, 8, 3), np.uint8), _binary_mask())
    _pair(root, "b", np.zeros((6, 8, 3), np.uint8), _binary_mask())
    assert dataset_info(root) == {"layout": "images-masks", "version": None, "name": None, "modalities": None,
                                  "channels": 3, "labels": None, "file_ending": ".png", "num_training": 2, "num_test": 0}
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match="no mask found"):
        dataset_info(root)


def test_nrrd_volume_reads_like_mha(tmp_path):
    a = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # (z, y, x)
    p = _mha(tmp_path / "v.nrrd", a, (0.6, 0.9, 3.0))
    assert n_slices(p) == 3
    for k in range(3):
        img, sp = read_image(p, k)
        np.testing.assert_array_equal(img[0], a[k])
        assert sp == pytest.approx((0.9, 0.6))
