"""Prompts from a case: its structured attributes in a fixed order, then its free text.

``render_prompt("Solitary nodule.", {"finding": "nodule", "sex": "F", "age": 64}, ["finding", "sex", "age"])``
gives ``"finding: nodule; sex: F; age: 60-69. Solitary nodule."``. The same function renders training captions
and sampling prompts, so a user asks for "finding: nodule; age: 60-69" in exactly the words the model learnt.
Ages are binned to decades: the model learns from more cases per value, and a prompt never carries an exact age.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

__all__ = ["AGE_BIN_WIDTH", "OLDEST_AGE_BIN", "age_bin", "parse_prompt", "prompt_attributes", "render_prompt"]

AGE_BIN_WIDTH = 10
OLDEST_AGE_BIN = 90  # one open bin from here on ("90+"), as the DICOM adapter caps ages at 90


def age_bin(age: int | float | str) -> str:
    """ "60-69" for 64 (or "64", 64.5); "90+" from 90 on. A value that is not a number is returned as given."""
    try:
        years = float(age)
    except (TypeError, ValueError):
        return str(age)
    if years < 0:
        raise ValueError(f"age must be >= 0, got {age!r}")
    if years >= OLDEST_AGE_BIN:
        return f"{OLDEST_AGE_BIN}+"
    low = int(years // AGE_BIN_WIDTH) * AGE_BIN_WIDTH
    return f"{low}-{low + AGE_BIN_WIDTH - 1}"


def _is_missing(value: object) -> bool:
    # None, "" and NaN (what a blank CSV cell becomes in pandas) all mean "not recorded".
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def _format_value(key: str, value: object) -> str:
    if key == "age" and not isinstance(value, bool):
        return age_bin(value)
    if isinstance(value, float):
        return f"{value:g}"  # 12.0 -> "12", 0.52 -> "0.52": one token per number
    return str(value).strip()


def render_prompt(text: str, attributes: Mapping[str, object], keys: Sequence[str]) -> str:
    """``"k1: v1; k2: v2. text"`` over `keys` in the given order; missing or empty attributes are skipped.

    With no attribute to show the prompt is the text alone, so an empty case renders as "" (the null prompt).
    """
    parts = [f"{key}: {value}" for key, value in prompt_attributes(attributes, keys).items()]
    text = " ".join(text.split())
    if not parts:
        return text
    header = "; ".join(parts) + "."
    return f"{header} {text}" if text else header


def prompt_attributes(attributes: Mapping[str, object], keys: Sequence[str]) -> dict[str, str]:
    """The attributes a prompt shows, as shown ("age": "60-69"): what a scorer compares synthetic samples on."""
    return {key: _format_value(key, attributes[key]) for key in keys if not _is_missing(attributes.get(key))}


_HEADER_END = re.compile(r"\.(?: |$)")


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attribute header of a rendered prompt back as a dict; ``{}`` when the prompt has no header.

    ``parse_prompt("finding: nodule; sex: F; age: 60-69. Solitary nodule.")`` gives
    ``{"finding": "nodule", "sex": "F", "age": "60-69"}``. The header ends at the first ". " (or a final "."),
    so values with inner dots ("0.52") survive.
    """
    end = _HEADER_END.search(prompt)
    header = prompt[: end.start()] if end else prompt
    pairs = [part.split(": ", 1) for part in header.split("; ")]
    if not all(len(pair) == 2 and pair[0].strip() and " " not in pair[0].strip() for pair in pairs):
        return {}  # free text only, or text that merely contains a colon
    return {key.strip(): value.strip() for key, value in pairs}
