"""Hospital-side data handling: dataset discovery, readers, prediction writers, preprocessing, plane geometry and splits.

Everything here runs at a hospital, on its own images and masks; nothing in this module talks to
the server. A dataset is a folder in one of the layouts

    root/images/<id>.<ext>     (.png .jpg .jpeg .tif .tiff .nii .nii.gz .mha .mhd .nrrd .nhdr .dcm, or a
                                folder of DICOM files holding one series)
    root/masks/<id>.<ext>      (same stem; the extension may differ; a DICOM RTSTRUCT drawn on the
                                series images/<id>/ is rasterised)

    root/dataset.json + imagesTr/ + labelsTr/ [+ imagesTs/]
                               nnU-Net's raw dataset (v2, or MSD / v1 without _0000 suffixes; several
                               channel files per case or a 4D NIfTI; :mod:`.discovery`)

    root/<series folder>/ + root/<folder>/<rtstruct>.dcm, or root/<patient>/... per patient
                               a DICOM-RT export such as CT/ + RTSTRUCT/ (ROIs become classes)

Predictions are written back with the source's exact geometry by :func:`write_prediction`
(:mod:`.writers`: NIfTI, MHA, NRRD, PNG; DICOM gets a NIfTI on the series grid and a DICOM SEG).

Orientation. Every reader returns a 2D plane as (H, W) = (rows, columns):

- 2D files (PIL, single-frame DICOM): the stored row order, unchanged.
- NIfTI: the axial slice is the last voxel axis; ``data[:, :, k].T``, so rows follow the second
  voxel axis (j) and columns the first (i). Spacing is ``(zooms[1], zooms[0])``.
- MHA/MHD/NRRD (SimpleITK): ``GetArrayFromImage(img)[k]``, shaped (y, x): the same convention as NIfTI
  (rows = second index axis, columns = first). Spacing is ``GetSpacing()[1], GetSpacing()[0]``.
- DICOM: ``pixel_array`` is (Rows, Columns); spacing is ``PixelSpacing`` (row, column); slices of a
  series are sorted along the slice normal (ImagePositionPatient and ImageOrientationPatient),
  else by ImagePositionPatient[2], else by InstanceNumber, else by file name. Images are rescaled
  (RescaleSlope/Intercept: CT in HU).

Stacked in slice order, these planes are exactly SimpleITK's ``GetArrayFromImage`` of the same file
(for a DICOM series: of ``ImageSeriesReader`` on GDCM's sorted file names, which the writer checks),
so a label volume built from them takes the source's geometry with ``CopyInformation``
(tests/test_formats.py checks it in world coordinates for every format).

Images and masks are paired in stored voxel order, without reorientation: an image and mask in
different 3D formats (say a DICOM series and a NIfTI mask) must have been written in the same
voxel order. Discovery checks that their slice counts agree and loading checks (H, W).

Randomness comes only from local ``np.random.default_rng(seed)`` generators.
"""

from __future__ import annotations

from ..config import Preprocess
from ..labels import LabelMap, parse_labels
from .discovery import (Case, dataset_info, dataset_layout, dicom_rt_series, discover_cases, discover_labels, nnunet_test_images,
                        read_case_mask)
from .layout import case_files, link_cases
from .geometry import (PlaneGeometry, center_crop, crop_box, crop_plane, region_box, roi_box, forward_image, forward_mask, plane_geometry,
                       resize_image, resize_mask, restore_labels, restore_scores)
from .preprocess import (Sample, check_intensity, intensity_map, load_arrays, load_sample, prepare_image, scale_intensity,
                         to_color)
from .readers import IMAGE_EXTS, is_rtstruct, n_slices, read_image, read_mask, rtstruct_roi_names, rtstruct_volume
from .splits import split_cases, split_from_lists
from .writers import output_format, output_names, render_prediction, write_prediction

__all__ = [
    "IMAGE_EXTS", "Case", "dataset_info", "dataset_layout", "link_cases", "case_files",
    "dicom_rt_series", "nnunet_test_images", "read_case_mask", "is_rtstruct", "rtstruct_roi_names",
    "rtstruct_volume", "discover_cases", "n_slices", "read_image", "read_mask", "Preprocess", "LabelMap", "discover_labels",
    "parse_labels", "Sample", "scale_intensity", "to_color", "resize_image", "resize_mask", "prepare_image", "crop_box",
    "center_crop", "roi_box", "region_box", "check_intensity", "intensity_map", "crop_plane", "PlaneGeometry", "plane_geometry", "forward_image", "forward_mask", "restore_scores", "restore_labels",
    "load_sample", "load_arrays", "split_cases", "split_from_lists", "output_format", "output_names", "render_prediction",
    "write_prediction",
]
