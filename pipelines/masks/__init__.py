"""Label maps for a mask-conditioned generator: lesion edits (insert, remove, move, resize) and the mask bank
(augmented training label maps)."""

from .lesion_edits import (
    RADIOGRAPH_ORIENTATION,
    RAS_VOLUME_ORIENTATION,
    LabelVocabulary,
    LesionEditRecord,
    LesionRequest,
    Orientation,
    apply_lesion_edit,
    default_orientation,
    orientation_from_affine,
    parse_lesion_request,
)
from .mask_bank import NO_AUGMENTATION, BankAugmentation, BankEntry, BankMask, MaskBank

__all__ = [
    "BankAugmentation",
    "BankEntry",
    "BankMask",
    "RADIOGRAPH_ORIENTATION",
    "RAS_VOLUME_ORIENTATION",
    "LabelVocabulary",
    "LesionEditRecord",
    "LesionRequest",
    "MaskBank",
    "NO_AUGMENTATION",
    "Orientation",
    "apply_lesion_edit",
    "default_orientation",
    "orientation_from_affine",
    "parse_lesion_request",
]
