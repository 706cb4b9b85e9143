"""Label-map edits that a mask-conditioned generator is then conditioned on: lesion insert, remove, move, resize."""

from .lesion_edits import (
    PHANTOM_VOLUME_ORIENTATION,
    RADIOGRAPH_ORIENTATION,
    LabelVocabulary,
    LesionEditRecord,
    LesionRequest,
    Orientation,
    apply_lesion_edit,
    default_orientation,
    orientation_from_affine,
    parse_lesion_request,
)

__all__ = [
    "PHANTOM_VOLUME_ORIENTATION",
    "RADIOGRAPH_ORIENTATION",
    "LabelVocabulary",
    "LesionEditRecord",
    "LesionRequest",
    "Orientation",
    "apply_lesion_edit",
    "default_orientation",
    "orientation_from_affine",
    "parse_lesion_request",
]
