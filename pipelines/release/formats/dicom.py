"""DICOM: one series per sample (``<id>/image_NNNN.dcm``) and, with a label map, a DICOM-SEG (``<id>/seg.dcm``).

3D samples are CT Image / MR Image series of single-frame slices; a 2D sample (X-ray) is a Secondary Capture
with ConversionType SYN ("synthetic image"), the simplest valid object for an image that no detector took.
Every instance says ``SyntheticData = YES``, images are ``DERIVED\\SECONDARY``, and the patient is the sample:
PatientName and PatientID are the sample id and nothing else about a person is written. Stored values are
unsigned 16-bit with a rescale slope/intercept spanning the sample's range, so HU come back for CT.
UIDs derive from the dataset, the sample and its provenance: rewriting a release gives the same UIDs.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage, generate_uid

from radsynth.pipelines.data.io import Image, spacing_of
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample

from .pairs import PNG_ENDING, planar, png16_pixels

VOLUME_SOP_CLASSES = {"ct": CTImageStorage, "mri": MRImageStorage}
DICOM_MODALITIES = {"ct": "CT", "mri": "MR", "xray": "DX"}
DERIVED_SECONDARY = ["DERIVED", "SECONDARY"]
# The CT Image IOD allows only AXIAL or LOCALIZER as ImageType value 3 (and readers skip LOCALIZERs).
VOLUME_IMAGE_TYPE_VALUE_3 = {"ct": "AXIAL", "mri": "OTHER"}
STORED_MAX = 65535
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SOFTWARE = "radsynth"


def write_dicom(samples: Sequence[ReleaseSample], out_dir: Path, info: DatasetInfo) -> list[Path]:
    paths = []
    for sample in samples:
        folder = out_dir / sample.sample_id
        images = image_instances(sample, info)
        for number, dataset in enumerate(images, start=1):
            paths.append(_save(dataset, folder / f"image_{number:04d}.dcm"))
        label = sample.read_label()
        if label is not None and label.array.any():  # a SEG needs at least one segmented pixel
            paths.append(_save(segmentation(images, frames(label, info), sample, info), folder / "seg.dcm"))
    return paths


def frames(image: Image, info: DatasetInfo) -> np.ndarray:
    """[frame, row, column]: a 2D image is one frame as it is; a volume [i, j, k] is slices k with rows along j
    and columns along i (the layout dcm2niix and our DICOM reader use)."""
    if info.spatial_dims == 2:
        return planar(image).array[None]
    return np.transpose(image.array, (2, 1, 0))


def image_instances(sample: ReleaseSample, info: DatasetInfo) -> list[Dataset]:
    image = sample.read_image()
    stored, slope, intercept = _stored_frames(sample, image, info)
    header = _series_header(sample, info)
    header.update({"RescaleSlope": f"{slope:.10g}", "RescaleIntercept": f"{intercept:.10g}"})
    instances = []
    for index, pixels in enumerate(stored):
        dataset = Dataset()
        dataset.update(header)
        dataset.SOPInstanceUID = _uid(sample, info, f"image {index}")
        dataset.InstanceNumber = index + 1
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.PixelData = pixels.tobytes()
        dataset.update(_plane(image, info, index))
        instances.append(dataset)
    return instances


def segmentation(images: list[Dataset], label_frames: np.ndarray, sample: ReleaseSample, info: DatasetInfo) -> Dataset:
    import highdicom
    from pydicom.sr.codedict import codes

    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=SOFTWARE, version=_version(), family=codes.cid7162.ArtificialIntelligence
    )
    # Label-map style input: every value from 1 to the largest one must be described, present or not.
    largest = max([int(label_frames.max()), *info.label_names])
    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=value,
            segment_label=str(info.label_names.get(value, f"label {value}")),
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for value in range(1, largest + 1)
    ]
    seg = highdicom.seg.Segmentation(
        source_images=images,
        pixel_array=label_frames.astype(np.uint8 if largest <= 255 else np.uint16),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(sample, info, "seg series"),
        series_number=2,
        sop_instance_uid=_uid(sample, info, "seg"),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=SOFTWARE,
        software_versions=_version(),
        device_serial_number=str(sample.sidecar.get("model_hash", ""))[:64] or "unknown",
        series_description="radsynth synthetic label map",
    )
    seg.SyntheticData = "YES"
    return seg


def _series_header(sample: ReleaseSample, info: DatasetInfo) -> Dataset:
    """What every image of the sample's series shares: patient = sample, marking, equipment, pixel format."""
    header = Dataset()
    header.Modality = DICOM_MODALITIES[info.modality]
    header.SyntheticData = "YES"
    header.BurnedInAnnotation = "NO"
    derivation = "derived from a real image" if sample.derived_from_real else "generated"
    header.DerivationDescription = f"radsynth synthetic sample ({derivation})"
    # Patient and study: the synthetic sample itself. Type 2 attributes stay empty; no date, no person.
    header.PatientName = f"{sample.sample_id}^"  # the caret makes it a one-component (family) name
    header.PatientID = sample.sample_id
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber"):
        setattr(header, keyword, "")
    header.StudyInstanceUID = _uid(sample, info, "study")
    header.StudyDescription = f"{info.name} (radsynth synthetic)"
    header.SeriesInstanceUID = _uid(sample, info, "image series")
    header.SeriesNumber = 1
    header.SeriesDescription = "radsynth synthetic image"
    header.Manufacturer = SOFTWARE
    header.SoftwareVersions = _version()
    header.SamplesPerPixel = 1
    header.PhotometricInterpretation = "MONOCHROME2"
    header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 16, 16, 15, 0
    header.RescaleType = "HU" if info.modality == "ct" else "US"
    header.update(_secondary_capture() if info.spatial_dims == 2 else _volume_slice(sample, info))
    return header


def _secondary_capture() -> Dataset:
    extra = Dataset()
    extra.SOPClassUID = SecondaryCaptureImageStorage
    extra.ImageType = DERIVED_SECONDARY
    extra.ConversionType = "SYN"
    extra.PatientOrientation = ""
    return extra


def _volume_slice(sample: ReleaseSample, info: DatasetInfo) -> Dataset:
    extra = Dataset()
    extra.SOPClassUID = VOLUME_SOP_CLASSES[info.modality]
    extra.ImageType = [*DERIVED_SECONDARY, VOLUME_IMAGE_TYPE_VALUE_3[info.modality]]
    extra.FrameOfReferenceUID = _uid(sample, info, "frame of reference")
    extra.PositionReferenceIndicator = ""
    if info.modality == "ct":
        extra.KVP, extra.AcquisitionNumber = "", ""
    else:  # MR Image module: type 1 sequence attributes, "RM" being the defined term for research mode
        extra.ScanningSequence, extra.SequenceVariant = "RM", "NONE"
        for keyword in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime"):
            setattr(extra, keyword, "")
    return extra


def _plane(image: Image, info: DatasetInfo, index: int) -> Dataset:
    """Geometry of frame ``index``: the pixel spacing of a 2D image; the full patient (LPS) position of a slice."""
    plane = Dataset()
    if info.spatial_dims == 2:
        # The SC Image module's own spacing attribute. PixelSpacing would make highdicom copy a Pixel Measures
        # item without SliceThickness into the SEG, which highdicom's own reader then refuses.
        row_step, column_step = spacing_of(planar(image).affine)
        plane.NominalScannedPixelSpacing = [f"{row_step:.10g}", f"{column_step:.10g}"]
        return plane
    affine = LPS_FROM_RAS @ image.affine
    column_step, row_step, slice_step = spacing_of(affine)
    # Rows run along array axis j and columns along i: the row cosine (direction of increasing column index) is
    # axis i's, the column cosine axis j's; PixelSpacing is [between rows, between columns].
    orientation = np.concatenate([affine[:3, 0] / column_step, affine[:3, 1] / row_step])
    plane.ImageOrientationPatient = [f"{value:.10g}" for value in orientation]
    plane.ImagePositionPatient = [f"{value:.10g}" for value in affine[:3, :3] @ [0, 0, index] + affine[:3, 3]]
    plane.PixelSpacing = [f"{row_step:.10g}", f"{column_step:.10g}"]
    plane.SliceThickness = f"{slice_step:.10g}"
    return plane


def _stored_frames(sample: ReleaseSample, image: Image, info: DatasetInfo) -> tuple[np.ndarray, float, float]:
    """uint16 frames and the (slope, intercept) that bring them back to physical units, rounded as DICOM's
    decimal strings store them. A 16-bit PNG sample keeps its own pixels and mapping: no second rounding."""
    if sample.image_path.suffix == PNG_ENDING:
        pixels, (low, high) = png16_pixels(sample)
        return pixels[None], _decimal((high - low) / STORED_MAX), _decimal(low)
    values = frames(image, info)
    low, high = float(values.min()), float(values.max())
    slope, intercept = _decimal((high - low) / STORED_MAX if high > low else 1.0), _decimal(low)
    return np.clip(np.rint((values - intercept) / slope), 0, STORED_MAX).astype(np.uint16), slope, intercept


def _decimal(value: float) -> float:
    return float(f"{value:.10g}")


def _uid(sample: ReleaseSample, info: DatasetInfo, role: str) -> str:
    provenance = [str(sample.sidecar.get(key, "")) for key in ("model_hash", "seed", "prompt")]
    return generate_uid(entropy_srcs=[info.name, sample.sample_id, *provenance, role])


def _version() -> str:
    try:
        return importlib.metadata.version("radsynth")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _save(dataset: Dataset, path: Path) -> Path:
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path
