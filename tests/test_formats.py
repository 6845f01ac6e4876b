"""Predictions that overlay: write_prediction keeps each input format's geometry (world-space checks).

Every source is built synthetically with an oblique direction, an origin offset and anisotropic
spacing. The "prediction" is a threshold of the planes the readers return, so it lands right only
if the writer inverts the readers' plane convention and keeps the geometry; the truth is the same
threshold of the source read by SimpleITK, in world coordinates. The written file is resampled by
SimpleITK (nearest neighbour) onto the source grid and compared by Dice: arrays are never compared
directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ppcmi.data import LabelMap, n_slices, read_image, read_mask
from ppcmi.data.writers import output_format, write_prediction
from ppcmi.errors import DataError, PpcmiError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # as tests/conftest.py; read, never copied

SIZE_XYZ = (23, 17, 9)  # odd, unequal sizes: a transposed or flipped axis cannot line up by chance
SPACING = (0.7, 1.3, 3.5)
ORIGIN = (-123.4, 56.7, 89.0)
LABELS = LabelMap((0, 1, 2), ("background", "lesion", "organ"))


def _direction() -> tuple[float, ...]:
    """A proper rotation about an oblique axis (about 25 degrees), row-major 3x3 as SimpleITK wants."""
    rot = sitk.VersorTransform((0.3, -0.5, 0.8), np.deg2rad(25.0))
    return tuple(float(v) for v in rot.GetMatrix())


def _phantom(size_xyz=SIZE_XYZ, seed: int = 3) -> sitk.Image:
    """int16 intensities: two off-centre blobs of different brightness over noise, oblique geometry."""
    x, y, z = (*size_xyz, 1)[:3]
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    arr = np.random.default_rng(seed).integers(0, 40, (z, y, x)).astype(np.int16)
    arr[((xx - 0.25 * x) / 4.0) ** 2 + ((yy - 0.3 * y) / 3.0) ** 2 + ((zz - 0.3 * z) / 2.0) ** 2 < 1] += 500
    arr[((xx - 0.7 * x) / 3.0) ** 2 + ((yy - 0.65 * y) / 5.0) ** 2 + ((zz - 0.7 * z) / 2.5) ** 2 < 1] += 1000
    img = sitk.GetImageFromArray(arr if len(size_xyz) == 3 else arr[0])
    img.SetSpacing(SPACING[: len(size_xyz)])
    img.SetOrigin(ORIGIN[: len(size_xyz)])
    img.SetDirection(_direction() if len(size_xyz) == 3 else (0.8, -0.6, 0.6, 0.8))
    return img


def _labels_of(values: np.ndarray) -> np.ndarray:
    """The 'segmentation': 2 where bright, 1 where medium, else 0."""
    return np.where(values > 900, 2, np.where(values > 400, 1, 0)).astype(np.int64)


def _truth(source_image: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayFromImage(source_image)
    lab = sitk.GetImageFromArray(_labels_of(arr).astype(np.uint8))
    lab.CopyInformation(source_image)
    return lab


def _predicted_planes(source: Path) -> list[np.ndarray]:
    n = n_slices(source)
    return [_labels_of(read_image(source, k)[0][0]) for k in ([None] if n is None else range(n))]


def _dice_in_world(written: Path, truth: sitk.Image) -> dict[int, float]:
    """Resample the written label map onto the truth's grid (nearest neighbour) and score each class."""
    pred = sitk.ReadImage(str(written))
    if pred.GetDimension() == 3 and truth.GetDimension() == 2:
        pred = pred[:, :, 0]
    on_grid = sitk.Resample(pred, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    p, t = sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(truth)
    out = {}
    for c in (1, 2):
        inter, total = np.sum((p == c) & (t == c)), np.sum(p == c) + np.sum(t == c)
        assert total > 0, f"class {c} is empty in both"
        out[c] = 2.0 * inter / total
    return out


def _assert_same_geometry(written: Path, reference: sitk.Image) -> None:
    w = sitk.ReadImage(str(written))
    assert w.GetSize() == reference.GetSize()
    np.testing.assert_allclose(w.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(w.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(w.GetDirection(), reference.GetDirection(), atol=1e-5)


# ----------------------------------------------------------------------------- DICOM fixtures


def _ct_series(folder: Path, image: sitk.Image, *, intercept: float = -1024.0, frame_uid: str | None = None,
               names: list[str] | None = None) -> list[str]:
    """Write ``image`` as a CT series with pydicom: one file per slice, random-looking names, InstanceNumber
    decreasing along the slice normal (as in real exports); pixels stored as ``value - intercept``.
    Returns the SOPInstanceUIDs in slice order (index k = SimpleITK's z index)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(image)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    study, series = generate_uid(entropy_srcs=["study", str(folder)]), generate_uid(entropy_srcs=["series", str(folder)])
    frame_uid = frame_uid or generate_uid(entropy_srcs=["frame", str(folder)])
    nz = arr.shape[0]
    order = np.random.default_rng(7).permutation(nz)
    uids = []
    for k in range(nz):
        uid = generate_uid(entropy_srcs=["sop", str(folder), str(k)])
        uids.append(uid)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_uid
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "CT", "Phantom^Test", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 3, nz - k
        ds.Manufacturer, ds.PositionReferenceIndicator = "synthetic", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{sz:.6g}"
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, intercept, "HU"
        ds.PixelData = (arr[k].astype(np.int32) - int(intercept)).astype("<u2").tobytes()
        name = names[k] if names else f"{order[k]:04x}-slice.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    return uids


def _written_seg(paths: list[Path]) -> Path:
    (seg,) = [p for p in paths if p.name.endswith(".seg.dcm")]
    return seg


def _check_seg(seg_path: Path, uids: list[str], frame_uid: str, planes: list[np.ndarray]) -> None:
    """The SEG references every source instance and the frame of reference, names its segments, and
    each source instance's frame holds that plane's prediction."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    assert seg.FrameOfReferenceUID == frame_uid
    refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == set(uids)
    assert [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence] == [(1, "lesion"), (2, "organ")]
    with_fg = [k for k, p in enumerate(planes) if p.any()]
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uids[k] for k in with_fg], combine_segments=True)
    for k, frame in zip(with_fg, got):
        np.testing.assert_array_equal(frame, planes[k])


# ----------------------------------------------------------------------------- per format


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
def test_volume_formats_overlay_in_world_coordinates(tmp_path, ext):
    source_img = _phantom()
    src = tmp_path / f"vol{ext}"
    sitk.WriteImage(source_img, str(src))
    planes = _predicted_planes(src)
    written = write_prediction(src, planes, tmp_path / "pred", "vol")
    want = {".nii.gz": "vol.nii.gz", ".nii": "vol.nii.gz", ".mha": "vol.mha", ".mhd": "vol.mha", ".nrrd": "vol.nrrd"}
    assert [p.name for p in written] == [want[ext]]
    reference = sitk.ReadImage(str(src))
    _assert_same_geometry(written[0], reference)
    assert _dice_in_world(written[0], _truth(reference)) == {1: 1.0, 2: 1.0}
    assert sitk.ReadImage(str(written[0])).GetPixelID() == sitk.sitkUInt8


def test_nifti_keeps_the_source_header_affines(tmp_path):
    import nibabel as nib

    src = tmp_path / "v.nii.gz"
    sitk.WriteImage(_phantom(), str(src))
    (out,) = write_prediction(src, _predicted_planes(src), tmp_path / "pred", "v")
    a, b = nib.load(str(src)), nib.load(str(out))
    assert b.shape == a.shape and b.get_data_dtype() == np.uint8
    np.testing.assert_allclose(b.get_qform(), a.get_qform(), atol=1e-6)
    np.testing.assert_allclose(b.get_sform(), a.get_sform(), atol=1e-6)
    assert int(b.header["qform_code"]) == int(a.header["qform_code"])
    assert int(b.header["sform_code"]) == int(a.header["sform_code"])


def test_2d_mha_and_png_and_tiff(tmp_path):
    img2d = _phantom((23, 17))
    src = tmp_path / "slice.mha"
    sitk.WriteImage(img2d, str(src))
    (out,) = write_prediction(src, _predicted_planes(src), tmp_path / "pred", "slice")
    _assert_same_geometry(out, sitk.ReadImage(str(src)))
    assert _dice_in_world(out, _truth(sitk.ReadImage(str(src)))) == {1: 1.0, 2: 1.0}

    arr = sitk.GetArrayFromImage(img2d).astype(np.uint16)
    for name in ("plane.png", "plane.tif"):
        p = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
        (out,) = write_prediction(p, _predicted_planes(p), tmp_path / "pred", Path(name).stem + "_" + name[-3:])
        assert out.suffix == ".png" and output_format(p) == "png"
        assert _dice_in_world(out, _truth(sitk.ReadImage(str(p)))) == {1: 1.0, 2: 1.0}


def test_dicom_series_gives_a_nifti_on_the_series_geometry_and_a_seg(tmp_path):
    source_img = _phantom()
    folder = tmp_path / "series"
    uids = _ct_series(folder, source_img, frame_uid="1.2.826.0.1.3680043.8.498.1")
    (folder / "notes.txt").write_text("not dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reference = reader.Execute()
    np.testing.assert_allclose(reference.GetDirection(), source_img.GetDirection(), atol=1e-6)  # the fixture is oblique

    planes = _predicted_planes(folder)
    written = write_prediction(folder, planes, tmp_path / "pred", "series", labels=LABELS)
    assert [p.name for p in written] == ["series.nii.gz", "series.seg.dcm"]
    _assert_same_geometry(written[0], reference)
    assert _dice_in_world(written[0], _truth(reference)) == {1: 1.0, 2: 1.0}
    _check_seg(written[1], uids, "1.2.826.0.1.3680043.8.498.1", planes)
    # ppcmi evaluate reads the label volume back with the readers, plane by plane
    assert all(np.array_equal(read_mask(written[0], k)[0], planes[k]) for k in range(len(planes)))


def test_single_dicom_file_gives_a_nifti_and_a_seg(tmp_path):
    source_img = _phantom()[:, :, 4:5]  # one oblique slice, as a 3D image of depth 1
    folder = tmp_path / "one"
    uids = _ct_series(folder, source_img, frame_uid="1.2.826.0.1.3680043.8.498.2", names=["slice.dcm"])
    src = folder / "slice.dcm"
    assert n_slices(src) is None
    planes = _predicted_planes(src)
    written = write_prediction(src, planes, tmp_path / "pred", "slice", labels=LABELS)
    assert [p.name for p in written] == ["slice.nii.gz", "slice.seg.dcm"]
    reference = sitk.ReadImage(str(src))
    _assert_same_geometry(written[0], reference)
    np.testing.assert_allclose(reference.GetOrigin(), source_img.GetOrigin(), atol=1e-4)
    assert _dice_in_world(written[0], _truth(reference)) == {1: 1.0, 2: 1.0}
    _check_seg(written[1], uids, "1.2.826.0.1.3680043.8.498.2", planes)


def test_seg_without_label_names_uses_the_values_present(tmp_path):
    import highdicom as hd

    folder = tmp_path / "series"
    _ct_series(folder, _phantom())
    planes = _predicted_planes(folder)
    (_, seg_path) = write_prediction(folder, [np.where(p == 2, 7, p) for p in planes], tmp_path / "pred", "s")
    seg = hd.seg.segread(seg_path)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["label 1", "label 7"]


# ----------------------------------------------------------------------------- refusals


def test_refuses_existing_files_wrong_counts_and_shapes(tmp_path):
    src = tmp_path / "v.mha"
    sitk.WriteImage(_phantom(), str(src))
    planes = _predicted_planes(src)
    write_prediction(src, planes, tmp_path / "pred", "v")
    before = (tmp_path / "pred" / "v.mha").read_bytes()
    with pytest.raises(PpcmiError, match="already exists"):
        write_prediction(src, planes, tmp_path / "pred", "v")
    assert (tmp_path / "pred" / "v.mha").read_bytes() == before
    flipped = [np.where(p == 1, 2, np.where(p == 2, 1, p)) for p in planes]
    write_prediction(src, flipped, tmp_path / "pred", "v", overwrite=True)  # replaced atomically when asked
    assert (tmp_path / "pred" / "v.mha").read_bytes() != before
    with pytest.raises(DataError, match=r"v\.mha: 8 prediction planes for an image of 9 planes"):
        write_prediction(src, planes[:-1], tmp_path / "pred", "w")
    with pytest.raises(DataError, match="17x22 but the image is 9 planes of 17x23"):
        write_prediction(src, [p[:, :-1] for p in planes], tmp_path / "pred", "w")
    with pytest.raises(DataError, match="not an integer label map"):
        write_prediction(src, [p.astype(np.float32) for p in planes], tmp_path / "pred", "w")
    with pytest.raises(DataError, match="not a plain file name"):
        write_prediction(src, planes, tmp_path / "pred", "../w")
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["v.mha"]


def test_dicom_series_refuses_an_existing_seg_before_writing_anything(tmp_path):
    folder = tmp_path / "series"
    _ct_series(folder, _phantom())
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "s.seg.dcm").write_bytes(b"x")
    with pytest.raises(PpcmiError, match=r"s\.seg\.dcm: already exists"):
        write_prediction(folder, _predicted_planes(folder), tmp_path / "pred", "s")
    assert not (tmp_path / "pred" / "s.nii.gz").exists()


# ----------------------------------------------------------------------------- real data


def test_real_ct_series_prediction_overlays_and_references_the_series(tmp_path):
    import highdicom as hd
    import pydicom

    ct = SHARED_DATA / "dicom_ct_lung1" / "CT"
    if not ct.is_dir():
        pytest.skip(f"shared dataset dicom_ct_lung1 not available at {ct}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct)))
    reference = reader.Execute()
    assert reference.GetSize() == (512, 512, 134)
    hu = sitk.GetArrayFromImage(reference)

    def segment(values: np.ndarray) -> np.ndarray:  # bone (> 300 HU) and lung-like air (< -500 HU), in HU
        return np.where(values > 300, 2, np.where(values < -500, 1, 0)).astype(np.int64)

    planes = [segment(read_image(ct, k)[0][0]) for k in range(134)]
    truth = sitk.GetImageFromArray(segment(hu).astype(np.uint8))
    truth.CopyInformation(reference)
    labels = LabelMap((0, 1, 2), ("background", "air", "bone"))
    written = write_prediction(ct, planes, tmp_path, "lung1", labels=labels)
    _assert_same_geometry(written[0], reference)
    assert _dice_in_world(written[0], truth) == {1: 1.0, 2: 1.0}
    seg = hd.seg.segread(written[1])
    first = pydicom.dcmread(next(ct.iterdir()), stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ct.iterdir()}


def test_real_msd_hippocampus_discovered_and_a_prediction_overlays_its_label(tmp_path):
    from ppcmi.data import dataset_info, discover_cases, discover_labels, read_mask

    root = SHARED_DATA / "msd_hippocampus"
    if not (root / "dataset.json").is_file():
        pytest.skip(f"shared dataset msd_hippocampus not available at {root}")
    cases = discover_cases(root)
    assert len({c.group for c in cases}) == 260
    assert {c.volume for c in cases} == {c.group for c in cases} and all(c.slice_index is not None for c in cases)
    assert {c.mask_path.name for c in cases} == {p.name for p in (root / "labelsTr").iterdir() if not p.name.startswith(".")}
    info = dataset_info(root)
    assert (info["layout"], info["version"], info["modalities"], info["num_training"], info["num_test"]) == \
        ("nnunet", 1, ["MRI"], 260, 130)
    assert discover_labels(cases, max_cases=40) == LabelMap((0, 1, 2), ("background", "Anterior", "Posterior"))
    # hippocampus_003's label is float32 (SOURCE.md): read as integers, written back onto its image's grid
    image = root / "imagesTr" / "hippocampus_003.nii.gz"
    label = root / "labelsTr" / "hippocampus_003.nii.gz"
    planes = [read_mask(label, c.slice_index)[0] for c in cases if c.image_path == image]
    assert len(planes) == n_slices(image)
    (out,) = write_prediction(image, planes, tmp_path, "hippocampus_003", labels=discover_labels(cases, max_cases=4))
    truth = sitk.Cast(sitk.ReadImage(str(label)), sitk.sitkUInt8)
    _assert_same_geometry(out, sitk.ReadImage(str(image)))
    assert _dice_in_world(out, truth) == {1: 1.0, 2: 1.0}


# ----------------------------------------------------------------------------- DICOM RTSTRUCT masks

# name -> (first row, last row, first col, last col, slices): pixel rectangles (inclusive) on a 32x32x6 series
RECTS = {"Body": (4, 27, 3, 25, range(1, 5)), "Tumour": (10, 14, 15, 20, range(2, 4)), "Cord": (20, 22, 5, 7, range(0, 6))}


def _rt_image(rows: int = 32, cols: int = 32) -> sitk.Image:
    img = sitk.GetImageFromArray(np.random.default_rng(1).integers(-100, 100, (6, rows, cols)).astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetOrigin(ORIGIN)
    img.SetDirection(_direction())
    return img


def _rtstruct(path: Path, series: Path, image: sitk.Image, rects=RECTS) -> None:
    """An RT Structure Set (pydicom) whose ROIs are ``rects``, as closed planar polygons through the corner
    pixel centres in patient coordinates (the world points of SimpleITK's index (col, row, slice))."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

    heads = {int(round(float(np.dot(np.asarray(d.ImagePositionPatient, float) - ORIGIN,
                                    np.asarray(image.GetDirection()).reshape(3, 3)[:, 2])) / 2.5)): d
             for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.iterdir())}
    ref = heads[0]

    def image_ref(k: int) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = heads[k].SOPClassUID, heads[k].SOPInstanceUID
        return r

    ds = Dataset()
    meta = FileMetaDataset()
    uid = generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTStructureSetStorage, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTStructureSetStorage, uid, "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, generate_uid()
    ds.PatientName, ds.PatientID, ds.StructureSetLabel = ref.PatientName, ref.PatientID, "test"
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ref.SeriesInstanceUID
    series_ref.ContourImageSequence = Seq([image_ref(k) for k in sorted(heads)])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID, study_ref.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", ref.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Seq([series_ref])
    frame = Dataset()
    frame.FrameOfReferenceUID = ref.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Seq([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Seq([frame])
    rois, contours, observations = [], [], []
    for number, (name, (r0, r1, c0, c1, slices)) in enumerate(rects.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, ref.FrameOfReferenceUID, name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        seq = []
        for k in slices:
            c = Dataset()
            c.ContourImageSequence = Seq([image_ref(k)])
            c.ContourGeometricType = "CLOSED_PLANAR"
            pts = [image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(k)))
                   for x, y in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))]
            c.NumberOfContourPoints = 4
            c.ContourData = [f"{v:.6f}" for p in pts for v in p]
            seq.append(c)
        rc = Dataset()
        rc.ReferencedROINumber, rc.ROIDisplayColor, rc.ContourSequence = number, [255, 0, 0], Seq(seq)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType, obs.ROIInterpreter = number, number, "ORGAN", ""
        observations.append(obs)
    ds.StructureSetROISequence, ds.ROIContourSequence = Seq(rois), Seq(contours)
    ds.RTROIObservationsSequence = Seq(observations)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _expected(image: sitk.Image, order: list[str]) -> sitk.Image:
    """The rectangles as a label image on ``image``'s grid: value i + 1 for ``order[i]``, the smaller ROI on top."""
    arr = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    for name in sorted(order, key=lambda n: -(RECTS[n][1] - RECTS[n][0] + 1) * (RECTS[n][3] - RECTS[n][2] + 1) * len(RECTS[n][4])):
        r0, r1, c0, c1, slices = RECTS[name]
        for k in slices:
            arr[k, r0:r1 + 1, c0:c1 + 1] = order.index(name) + 1
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(image)
    return lab


def test_rtstruct_export_layout_overlays_in_world_coordinates(tmp_path):
    from ppcmi.data import dataset_info, discover_cases, discover_labels, read_case_mask

    image = _rt_image()
    patient = tmp_path / "export" / "patient7"
    _ct_series(patient / "CT", image)
    _rtstruct(patient / "RTSTRUCT" / "rs.dcm", patient / "CT", image)
    for root in (patient, tmp_path / "export"):  # one patient folder, or a folder of them
        cases = discover_cases(root)
        assert [c.case_id for c in cases] == [f"patient7_z{k:03d}" for k in range(6)]
        assert cases[0].image_path == patient / "CT" and cases[0].rois == ("Body", "Cord", "Tumour")
    assert discover_labels(cases) == LabelMap((0, 1, 2, 3), ("background", "Body", "Cord", "Tumour"))
    info = dataset_info(patient)
    assert (info["layout"], info["modalities"], info["labels"]["names"]) == ("dicom-rt", ["CT"], ["background", "Body", "Cord", "Tumour"])
    planes = [read_case_mask(c)[0] for c in cases]
    (out, _) = write_prediction(patient / "CT", planes, tmp_path / "pred", "patient7", labels=discover_labels(cases))
    reference = sitk.ReadImage(str(out))
    expected = _expected(image, ["Body", "Cord", "Tumour"])
    p = sitk.GetArrayFromImage(sitk.Resample(reference, expected, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    t = sitk.GetArrayFromImage(expected)
    for v in (1, 2, 3):
        assert 2 * np.sum((p == v) & (t == v)) / (np.sum(p == v) + np.sum(t == v)) == 1.0, v

    # a flat export: the series and the RTSTRUCT in one folder
    flat = tmp_path / "flat"
    _ct_series(flat, image)
    _rtstruct(flat / "rs.dcm", flat, image)
    flat_cases = discover_cases(flat)
    assert flat_cases[0].image_path == flat and len(flat_cases) == 6
    assert all(np.array_equal(read_case_mask(a)[0], pl) for a, pl in zip(flat_cases, planes))

    # choosing and ordering the ROIs; a missing name is refused with the names the file holds
    chosen = discover_cases(patient, rois=["Tumour", "Body"])
    assert discover_labels(chosen) == LabelMap((0, 1, 2), ("background", "Tumour", "Body"))
    vol = np.stack([read_case_mask(c)[0] for c in chosen])
    np.testing.assert_array_equal(vol, sitk.GetArrayFromImage(_expected(image, ["Tumour", "Body"])) * (vol >= 0))
    with pytest.raises(DataError, match=r"rs\.dcm: no ROI named 'Lung' \(the RTSTRUCT holds 'Body', 'Tumour', 'Cord'\)"):
        discover_cases(patient, rois=["Lung"])


def test_rtstruct_in_images_masks_layout_and_refusals(tmp_path):
    from ppcmi.data import discover_cases, read_case_mask

    image = _rt_image()
    root = tmp_path / "ds"
    _ct_series(root / "images" / "p1", image)
    _rtstruct(root / "masks" / "p1.dcm", root / "images" / "p1", image)
    cases = discover_cases(root)
    assert len(cases) == 6 and cases[3].rois == ("Body", "Cord", "Tumour")
    np.testing.assert_array_equal(read_case_mask(cases[3])[0], sitk.GetArrayFromImage(_expected(image, ["Body", "Cord", "Tumour"]))[3])
    with pytest.raises(DataError, match="needs its image series"):
        read_mask(root / "masks" / "p1.dcm", 3)
    plain = tmp_path / "plain"
    _ct_series(plain / "images" / "p1", image)
    (plain / "masks").mkdir()
    sitk.WriteImage(_expected(image, ["Cord"]), str(plain / "masks" / "p1.nii.gz"))
    with pytest.raises(DataError, match="has no RTSTRUCT masks"):
        discover_cases(plain, rois=["Body"])

    wide = _rt_image(rows=32, cols=30)  # rt-utils 1.2.7 rasterises only square slices correctly
    other = tmp_path / "wide"
    _ct_series(other / "CT", wide)
    _rtstruct(other / "RTSTRUCT" / "rs.dcm", other / "CT", wide, {"Cord": RECTS["Cord"]})
    (case, *_) = discover_cases(other)
    with pytest.raises(DataError, match=r"rs\.dcm: RTSTRUCT rasterisation \(rt-utils 1.2.7\) needs square slices"):
        read_case_mask(case)


def test_real_rtstruct_rasterises_as_source_md_says(tmp_path):
    """dicom_ct_lung1/SOURCE.md: slice ranges (0-based, sorted by z), volumes and mean HU per ROI."""
    from ppcmi.data import discover_cases, read_case_mask, rtstruct_volume

    root = SHARED_DATA / "dicom_ct_lung1"
    if not (root / "RTSTRUCT").is_dir():
        pytest.skip(f"shared dataset dicom_ct_lung1 not available at {root}")
    table = {"GTV-1": (65, 85, 160.7, -68), "Spinal-Cord": (27, 110, 51.1, 28), "Lung-Left": (24, 111, 2343, -746),
             "Lung-Right": (23, 108, 3035, -795)}
    cases = discover_cases(root)
    assert len(cases) == 134 and cases[0].labels.names == ("background", "GTV-1", "Lung-Left", "Lung-Right", "Spinal-Cord")
    hu = np.stack([read_image(root / "CT", k)[0][0] for k in range(134)])
    assert hu.min() == -1024  # HU through RescaleIntercept -1024
    voxel_ml = 0.9765625 * 0.9765625 * 3.0 / 1000
    rt = cases[0].mask_path
    for name, (first, last, ml, mean_hu) in table.items():
        vol = rtstruct_volume(rt, root / "CT", [name]) > 0  # each ROI alone, as the table counts it
        z = np.nonzero(vol.any(axis=(1, 2)))[0]
        assert (z.min(), z.max()) == (first, last), name
        assert vol.sum() * voxel_ml == pytest.approx(ml, rel=0.02), name  # rt-utils rounds polygon vertices to pixels
        assert float(hu[vol].mean()) == pytest.approx(mean_hu, abs=10), name
    # all four together through the case API: the GTV (smallest) keeps the voxels it shares with a lung
    together = np.stack([read_case_mask(c)[0] for c in cases])
    gtv = rtstruct_volume(rt, root / "CT", ["GTV-1"]) > 0
    assert np.array_equal(together == 1, gtv)


def test_nifti_4d_channels_and_2d_sources_give_labels_on_the_spatial_grid(tmp_path):
    import nibabel as nib

    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix() @ np.diag([0.7, 1.3, 3.5])
    affine[:3, 3] = ORIGIN
    ch0 = np.transpose(sitk.GetArrayFromImage(_phantom()), (2, 1, 0))  # (i, j, k)
    src = tmp_path / "mc.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([ch0, -ch0], axis=-1).astype(np.float32), affine), str(src))
    ref3d = tmp_path / "ch0.nii.gz"
    nib.save(nib.Nifti1Image(ch0.astype(np.float32), affine), str(ref3d))
    assert read_image(src, 0)[0].shape == (2, 17, 23)
    (out,) = write_prediction(src, _predicted_planes(src), tmp_path / "pred", "mc")
    written = nib.load(str(out))
    assert written.shape == ch0.shape and np.allclose(written.affine, affine, atol=1e-5)
    assert _dice_in_world(out, _truth(sitk.ReadImage(str(ref3d)))) == {1: 1.0, 2: 1.0}

    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(ch0[:, :, 4:5].astype(np.int16), affine), str(flat))
    assert n_slices(flat) is None
    (out2,) = write_prediction(flat, _predicted_planes(flat), tmp_path / "pred", "flat")
    assert nib.load(str(out2)).shape == (23, 17, 1)
    assert _dice_in_world(out2, _truth(sitk.ReadImage(str(flat)))) == {1: 1.0, 2: 1.0}


def test_client_label_maps_of_a_dicom_series_go_through_the_writer(tmp_path):
    """inference._write_label_maps groups planes by source, restores slice order and writes NIfTI + SEG."""
    import highdicom as hd

    from ppcmi.client.inference import _write_label_maps, list_inputs

    source_img = _phantom()
    folder = tmp_path / "series"
    _ct_series(folder, source_img)
    png = tmp_path / "plane.png"
    sitk.WriteImage(sitk.GetImageFromArray(sitk.GetArrayFromImage(source_img)[4].astype(np.uint16)), str(png))
    planes = list_inputs([folder]) + list_inputs([png])
    assert [p["format"] for p in planes] == ["dicom"] * 9 + ["png"]
    for pl in planes:
        pl["original_shape"] = [17, 23]
    idx = np.stack([_predicted_planes(Path(pl["source"]))[pl["slice_index"] or 0] for pl in planes])
    order = np.random.default_rng(0).permutation(len(planes))  # rows arrive in any order
    written = _write_label_maps([planes[i] for i in order], idx[order], LABELS, tmp_path / "out")
    assert sorted(p.name for p in written) == ["plane.png", "series.nii.gz", "series.seg.dcm"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    assert _dice_in_world(tmp_path / "out" / "series.nii.gz", _truth(reader.Execute())) == {1: 1.0, 2: 1.0}
    assert [str(s.SegmentLabel) for s in hd.seg.segread(tmp_path / "out" / "series.seg.dcm").SegmentSequence] == \
        ["lesion", "organ"]


def test_enhanced_multiframe_ct_is_rescaled_and_its_prediction_overlays(tmp_path):
    """A multi-frame CT (highdicom's legacy converted enhanced CT of a series, frames stored against the
    slice normal): frames are rescaled to HU from the functional groups as SimpleITK reads them, and the
    prediction lands on the original series' voxels in world coordinates."""
    import highdicom as hd
    import pydicom

    source_img = _phantom()
    _ct_series(tmp_path / "series", source_img)
    frames = [pydicom.dcmread(f) for f in sorted((tmp_path / "series").iterdir())]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(frames, series_instance_uid=hd.UID(), series_number=5,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    src = tmp_path / "mf.dcm"
    mf.save_as(src)
    assert "RescaleIntercept" not in pydicom.dcmread(src, stop_before_pixels=True)  # only in the functional groups
    assert n_slices(src) == 9
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(src)))
    assert all(np.array_equal(read_image(src, k)[0][0], hu[k]) for k in range(9))
    planes = _predicted_planes(src)
    written = write_prediction(src, planes, tmp_path / "pred", "mf", labels=LABELS)
    assert [p.name for p in written] == ["mf.nii.gz", "mf.seg.dcm"]
    assert _dice_in_world(written[0], _truth(source_img)) == {1: 1.0, 2: 1.0}
    seg = hd.seg.segread(written[1])
    refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == {str(mf.SOPInstanceUID)} and seg.FrameOfReferenceUID == mf.FrameOfReferenceUID



def test_dicom_series_without_positions_follows_the_readers_order(tmp_path, caplog):
    """No ImagePositionPatient (e.g. a secondary capture stack): no geometry to keep; the label volume
    takes the readers' order (InstanceNumber) and the in-plane spacing, with a warning."""
    import logging

    import pydicom

    folder = tmp_path / "series"
    _ct_series(folder, _phantom())
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    planes = _predicted_planes(folder)
    with caplog.at_level(logging.WARNING):
        (nii, *_) = write_prediction(folder, planes, tmp_path / "pred", "s", labels=LABELS)
    assert "without ImagePositionPatient" in caplog.text
    assert all(np.array_equal(read_mask(nii, k)[0], planes[k]) for k in range(9))
    np.testing.assert_allclose(sitk.ReadImage(str(nii)).GetSpacing()[:2], SPACING[:2], atol=1e-5)
