"""The static HTML report of a release: one self-contained ``report.html`` (images and plots as data URIs).

A gallery per prompted condition (each image windowed for its modality, label maps overlaid; 3D samples as three
orthogonal slices), the headline metrics next to their real-vs-real floor, the gate checks against their limits,
and plots of both. Every piece of text on the page comes from configs, prompts or data and is escaped.
Plots use matplotlib's object API (``Figure``), never pyplot, so no display and no global backend are touched.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from nibabel.orientations import apply_orientation, io_orientation
from PIL import Image as PILImage

from radsynth.pipelines.data.io import Image, write_text
from radsynth.pipelines.release.card import (
    SYNTHETIC_STATEMENT,
    format_guidance,
    format_interval,
    format_limit,
    format_number,
    format_reference,
    label_names,
    sample_kind,
    section,
)
from radsynth.pipelines.release.samples import ReleaseSample

CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # level 40 HU, width 400 HU
PERCENTILE_WINDOW = (1.0, 99.0)  # MRI and X-ray have no absolute scale: window each image on its own spread
OVERLAY_ALPHA = 0.4
# Distinct, colour-blind tolerable colours (Trubetskoy's list); label k > 0 gets LABEL_COLOURS[(k - 1) % 10].
LABEL_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))
DISPLAY_SIZE = 192  # pixels across a sample's longest physical extent
PLANE_GAP = 4  # pixels between the orthogonal slices of a 3D sample, and between the image and its overlay
GAP_GREY = 40
# Views of a RAS volume as (fixed axis, row axis, column axis); rows and columns are both flipped so that superior /
# anterior is up and the patient's right is on the viewer's left (radiological convention).
ORTHOGONAL_VIEWS = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}
PASS_COLOUR, FAIL_COLOUR, REAL_COLOUR = "#2e7d32", "#c62828", "#546e7a"
NO_CONDITION = "(no prompted condition)"


def write_html_report(folder: Path, samples: Sequence[ReleaseSample], provenance: dict, max_per_condition: int = 4,
                      group_by: Sequence[str] | None = None) -> Path:
    """Write ``folder/report.html`` and return its path.

    samples: the released samples; only the (at most ``max_per_condition`` per group) shown ones are read.
    group_by: prompt attributes that define a gallery group. None: the config's class attribute, else its first
        conditioning attribute (the finding, in the presets), else every prompted attribute.
    """
    dataset = section(provenance, "dataset")
    modality = str(dataset.get("modality") or (samples[0].sidecar.get("modality") if samples else ""))
    attributes = list(group_by) if group_by is not None else _default_group_attributes(provenance)
    groups = group_samples(samples, attributes)
    body = "\n".join([
        _header(provenance, len(samples)),
        _gallery(groups, label_names(dataset), modality, max_per_condition),
        _evaluation(section(provenance, "scorecard")),
        _gate(section(provenance, "gate"), section(provenance, "filter")),
        _limitations(provenance.get("limitations") or []),
        _footer(section(provenance, "software")),
    ])
    title = " ".join(str(part) for part in (dataset.get("name") or "radsynth release", dataset.get("version"), "(synthetic data)")
                     if part)
    return write_text(Path(folder) / "report.html", _page(title, body))


# ---- grouping -------------------------------------------------------------------------------------------------


def _default_group_attributes(provenance: Mapping) -> list[str] | None:
    conditioning = section(section(provenance, "config"), "conditioning")
    if conditioning.get("class_attribute"):
        return [str(conditioning["class_attribute"])]
    attributes = conditioning.get("attributes") or []
    return [str(attributes[0])] if attributes else None


def group_samples(samples: Sequence[ReleaseSample], attributes: Sequence[str] | None) -> dict[str, list[ReleaseSample]]:
    """Samples by the values of ``attributes`` in their prompts (None: all prompted attributes), groups sorted."""
    groups: dict[str, list[ReleaseSample]] = {}
    for sample in samples:
        keys = attributes if attributes is not None else sorted(sample.conditions)
        pairs = [f"{key}: {sample.conditions[key]}" for key in keys if key in sample.conditions]
        groups.setdefault("; ".join(pairs) or NO_CONDITION, []).append(sample)
    return dict(sorted(groups.items()))


# ---- images ---------------------------------------------------------------------------------------------------


def render_sample(sample: ReleaseSample, modality: str) -> np.ndarray:
    """The sample as an RGB uint8 picture at physical aspect: the windowed image, and below it, when the sample has a
    label map, the same with label colours blended on top (a large label such as "body" would hide the image)."""
    image, label = sample.read_image(), sample.read_label()
    window = display_window(image.array, modality)
    planes = display_planes(image, label)
    pixels_per_mm = DISPLAY_SIZE / max(max(n * s for n, s in zip(plane.shape, spacing)) for plane, _, spacing in planes)
    overlays = (False, True) if label is not None else (False,)
    rows = [[_resize(overlay_labels(_to_grey(plane, window), labels if overlay else None), spacing, pixels_per_mm)
             for plane, labels, spacing in planes] for overlay in overlays]
    return _tile([_tile(row, axis=1) for row in rows], axis=0)


def display_window(array: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "ct":
        return CT_SOFT_TISSUE_WINDOW
    low, high = (float(v) for v in np.percentile(array, PERCENTILE_WINDOW))
    return (low, high) if high > low else (low, low + 1.0)  # a flat image shows as one grey


def display_planes(image: Image, label: Image | None) -> list[tuple[np.ndarray, np.ndarray | None, tuple[float, float]]]:
    """(image plane, label plane or None, (row, column) spacing in mm): the image itself in 2D; in 3D three orthogonal
    slices through the centre of the smallest labelled structure (usually the prompted lesion), else the middle."""
    labels = None if label is None else np.asarray(label.array)
    if image.array.ndim == 2:
        return [(np.asarray(image.array, dtype=np.float64), labels, image.spacing)]
    orientation = io_orientation(image.affine)
    volume = apply_orientation(np.asarray(image.array, dtype=np.float64), orientation)
    labels = None if labels is None else apply_orientation(labels, orientation)
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = image.spacing
    focus = _focus_voxel(labels, volume.shape)
    return [(_view(volume, rows, columns, focus[fixed]), None if labels is None else _view(labels, rows, columns, focus[fixed]),
             (float(spacing[rows]), float(spacing[columns]))) for fixed, rows, columns in ORTHOGONAL_VIEWS.values()]


def _view(volume: np.ndarray, rows: int, columns: int, index: int) -> np.ndarray:
    return np.moveaxis(volume, (rows, columns), (0, 1))[::-1, ::-1, index]


def _focus_voxel(labels: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if labels is None or not labels.any():
        return tuple(n // 2 for n in shape)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    centre = np.argwhere(labels == values[np.argmin(counts)]).mean(axis=0)
    return tuple(int(round(c)) for c in centre)


def label_colour(value: int) -> tuple[int, int, int]:
    return LABEL_COLOURS[(int(value) - 1) % len(LABEL_COLOURS)]


def overlay_labels(grey: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Grey (H, W) uint8 to RGB, each label's colour blended in at OVERLAY_ALPHA; background stays grey."""
    rgb = np.repeat(grey[..., None].astype(np.float64), 3, axis=-1)
    if labels is not None:
        for value in np.unique(labels[labels > 0]):
            mask = labels == value
            rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * np.asarray(label_colour(value), dtype=np.float64)
    return np.rint(rgb).astype(np.uint8)


def _to_grey(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return np.rint(np.clip((plane - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _resize(rgb: np.ndarray, spacing: tuple[float, float], pixels_per_mm: float) -> np.ndarray:
    # Nearest neighbour: upsampled voxels stay visible as voxels and label colours stay exact.
    height, width = (max(1, round(n * s * pixels_per_mm)) for n, s in zip(rgb.shape[:2], spacing))
    return np.asarray(PILImage.fromarray(rgb).resize((width, height), PILImage.Resampling.NEAREST))


def _tile(pictures: list[np.ndarray], axis: int) -> np.ndarray:
    """Pictures side by side (axis 1) or stacked (axis 0), PLANE_GAP apart, the shorter ones padded with GAP_GREY."""
    across = 1 - axis
    size = max(picture.shape[across] for picture in pictures)
    padded = []
    for index, picture in enumerate(pictures):
        padding = [(0, 0)] * 3
        padding[across] = (0, size - picture.shape[across])
        padding[axis] = (0, PLANE_GAP if index < len(pictures) - 1 else 0)
        padded.append(np.pad(picture, padding, constant_values=GAP_GREY))
    return np.concatenate(padded, axis=axis)


def _png_data_uri(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- plots ----------------------------------------------------------------------------------------------------


def metrics_figure(rows: Sequence[Mapping]) -> Figure | None:
    """One panel per headline metric: the synthetic value and the real floor, each with its 95% CI."""
    rows = [row for row in rows if row.get("value") is not None]
    if not rows:
        return None
    figure, panels = _panels(len(rows))
    for axis, row in zip(panels, rows):
        _interval_marker(axis, 1, row, "", "#1565c0")
        if row.get("reference_value") is not None:
            _interval_marker(axis, 0, row, "reference_", REAL_COLOUR)
        axis.set_yticks([0, 1], [textwrap.fill(str(row.get("reference_name") or "real"), 16), "synthetic"])
        axis.set_ylim(-0.6, 1.6)
        axis.set_title(_panel_title(row.get("metric"), row.get("feature_space"), row.get("stratum")), fontsize=8)
    return figure


def gate_figure(checks: Sequence[Mapping]) -> Figure | None:
    """One panel per gate check: its value (green passed, red failed) against its limit, allowed side shaded."""
    if not checks:
        return None
    figure, panels = _panels(len(checks), height=1.3)
    for axis, check in zip(panels, checks):
        value, limit = check.get("value"), check.get("limit")
        colour = PASS_COLOUR if check.get("passed") else FAIL_COLOUR
        axis.set_yticks([])
        axis.set_title(_panel_title(check.get("name"), check.get("stratum")), fontsize=8, color=colour)
        known = [float(v) for v in (value, limit) if v is not None]
        if not known:
            axis.text(0.5, 0.5, "not computed", ha="center", va="center", transform=axis.transAxes)
            continue
        span = (max(known) - min(known)) or abs(known[0]) or 1.0
        axis.set_xlim(min(known) - 0.6 * span, max(known) + 0.6 * span)
        if limit is not None:
            allowed = (axis.get_xlim()[0], limit) if check.get("comparison") == "<=" else (limit, axis.get_xlim()[1])
            axis.axvspan(*allowed, color=PASS_COLOUR, alpha=0.12, linewidth=0)
            axis.axvline(limit, color="black", linestyle="--", linewidth=1)
        if value is not None:
            axis.plot([value], [0], "o", color=colour, markersize=8)
    return figure


def _panels(count: int, height: float = 1.8) -> tuple[Figure, list]:
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(3.1 * columns, height * rows + 0.3), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.set_axis_off()
    for axis in axes[:count]:
        axis.tick_params(labelsize=7)
        axis.grid(axis="x", alpha=0.3)
        axis.margins(x=0.12)
    return figure, list(axes[:count])


def _interval_marker(axis, y: float, row: Mapping, prefix: str, colour: str) -> None:
    # Drawn as a segment, not errorbar(): a percentile bootstrap CI (adherence, utility) need not contain its point.
    low, high = row.get(f"{prefix}ci_low"), row.get(f"{prefix}ci_high")
    if low is not None and high is not None:
        axis.plot([low, high], [y, y], "-|", color=colour, linewidth=2, markersize=8)
    axis.plot([row[f"{prefix}value"]], [y], "o", color=colour, markersize=6)


def _panel_title(name: object, *qualifiers: object) -> str:
    """The name on the first line, what it was measured on (feature space, stratum) on the second."""
    details = " | ".join(str(part) for part in qualifiers if part not in (None, "", "-", "all"))
    return "\n".join(_clip_text(str(line), 44) for line in (name, details) if line)


def _clip_text(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _figure_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- HTML -----------------------------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text))


def _header(provenance: Mapping, n_samples: int) -> str:
    dataset, generator, gate = (section(provenance, key) for key in ("dataset", "generator", "gate"))
    facts = [f"{n_samples} synthetic {sample_kind(dataset)}",
             f"created {dataset.get('created') or 'n/a'}", f"generator {str(generator.get('model_hash') or 'unknown')[:16]}",
             f"{generator.get('scheduler') or 'n/a'}, {format_number(generator.get('num_inference_steps'))} steps, "
             f"guidance {format_guidance(generator)}"]
    status = _badge(gate.get("passed"), "gate passed", "gate failed") if gate else ""
    derived = int(dataset.get("derived_from_real") or 0)
    return "\n".join([
        f"<h1>{_e(dataset.get('name') or 'radsynth release')} {_e(dataset.get('version') or '')} "
        '<span class="synthetic-tag">synthetic</span></h1>',
        f'<p class="facts">{" · ".join(_e(fact) for fact in facts)} {status}</p>',
        *([f'<p class="warning">{derived} samples are derived from real images (real anatomy): internal use only.</p>']
          if derived else []),
        '<nav><a href="#gallery">Samples</a><a href="#evaluation">Evaluation</a><a href="#gate">Gate</a>'
        '<a href="#limitations">Limitations</a></nav>',
    ])


def _gallery(groups: Mapping[str, Sequence[ReleaseSample]], names: Mapping[int, str], modality: str,
             max_per_condition: int) -> str:
    window = "soft-tissue window (level 40, width 400 HU)" if modality == "ct" else \
        f"window: percentiles {PERCENTILE_WINDOW[0]:g} to {PERCENTILE_WINDOW[1]:g} of each image"
    parts = ['<section id="gallery">', "<h2>Samples</h2>",
             f'<p class="note">At most {max_per_condition} per condition; {_e(window)}; 3D samples show axial, coronal and '
             "sagittal slices through the smallest labelled structure (radiological view); label maps are overlaid on a "
             "second copy below each image.</p>", _legend(names)]
    for condition, members in groups.items():
        shown = members[:max_per_condition]
        parts += [f'<section class="group" data-condition="{_e(condition)}">',
                  f"<h3>{_e(condition)} <small>{len(shown)} of {len(members)}</small></h3>", '<div class="grid">',
                  *[_sample_figure(sample, modality) for sample in shown], "</div>", "</section>"]
    parts.append("</section>")
    return "\n".join(parts)


def _legend(names: Mapping[int, str]) -> str:
    items = [f'<span class="swatch" style="background: rgb({", ".join(map(str, label_colour(index)))})"></span>{_e(name)}'
             for index, name in names.items() if index != 0]
    return f'<p class="legend">{" ".join(f"<span>{item}</span>" for item in items)}</p>' if items else ""


def _sample_figure(sample: ReleaseSample, modality: str) -> str:
    conditions = "; ".join(f"{key}: {value}" for key, value in sample.conditions.items())
    badges = '<span class="badge synthetic">synthetic</span>' if sample.is_synthetic else \
        '<span class="badge fail">not marked synthetic</span>'
    if sample.derived_from_real:
        badges += ' <span class="badge warn">derived from real</span>'
    return (f'<figure data-sample="{_e(sample.sample_id)}"><img src="{_png_data_uri(render_sample(sample, modality))}" '
            f'alt="synthetic sample {_e(sample.sample_id)}" title="{_e(sample.prompt)}">'
            f"<figcaption><b>{_e(sample.sample_id)}</b> {badges}<br>{_e(conditions or sample.prompt)}</figcaption></figure>")


def _evaluation(scorecard: Mapping) -> str:
    rows = scorecard.get("rows") or []
    parts = ['<section id="evaluation">', "<h2>Evaluation</h2>"]
    sizes = section(scorecard, "sizes")
    if sizes:
        parts.append(f'<p class="note">Sample sizes: {_e(", ".join(f"{k} {v}" for k, v in sizes.items()))}. '
                     "Intervals are 95% patient-level CIs (half-samples centred on the value for realism, bootstrap "
                     "otherwise); the real floor is real data scored the same way.</p>")
    verdicts = section(scorecard, "verdicts")
    if verdicts:
        parts.append(_table(["verdict", "result", "reasons"],
                            [[name, "PASSED" if v.get("passed") else "FAILED", "; ".join(map(str, v.get("reasons") or []))]
                             for name, v in verdicts.items()],
                            [_status_class(v.get("passed")) for v in verdicts.values()], "verdicts"))
    if rows:
        parts.append(_table(["section", "metric", "feature space", "stratum", "synthetic (95% CI)", "real floor (95% CI)",
                             "n", "better"],
                            [[row.get("section"), row.get("metric"), row.get("feature_space"), row.get("stratum"),
                              format_interval(row), format_reference(row), format_number(row.get("n")), row.get("better") or ""]
                             for row in rows], table_id="metrics"))
        parts.append(_figure(metrics_figure(rows), "Headline metrics (blue, synthetic) against the real floor (grey)"))
    else:
        parts.append("<p>No scorecard was recorded.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _gate(gate: Mapping, filtered: Mapping) -> str:
    parts = ['<section id="gate">', "<h2>Gate</h2>"]
    if filtered:
        dropped = section(filtered, "dropped")
        parts.append(_table(["scored", "released", *[f"dropped: {reason}" for reason in dropped]],
                            [[format_number(filtered.get("n_scored")), format_number(filtered.get("n_released")),
                              *map(format_number, dropped.values())]], table_id="filter"))
    checks = gate.get("checks") or []
    if gate:
        parts.append(f"<p>Dataset-level gate: {_badge(gate.get('passed'), 'PASSED', 'FAILED')}</p>")
    if checks:
        parts.append(_table(["check", "stratum", "value", "limit", "result", "privacy", "reason"],
                            [[check.get("name"), check.get("stratum") or "", format_number(check.get("value")),
                              format_limit(check), "passed" if check.get("passed") else "failed",
                              "yes" if check.get("privacy") else "", check.get("reason") or ""] for check in checks],
                            [_status_class(check.get("passed")) for check in checks], "gate-checks"))
        parts.append(_figure(gate_figure(checks), "Gate checks: value (dot) against limit (dashed), allowed side shaded"))
    elif not gate:
        parts.append("<p>No dataset-level gate was run.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _limitations(limitations: Sequence[str]) -> str:
    items = "".join(f"<li>{_e(item)}</li>" for item in limitations)
    return f'<section id="limitations"><h2>Limitations</h2><ul>{items or "<li>None recorded.</li>"}</ul></section>'


def _footer(software: Mapping) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in software.items())
    return f"<footer>Generated by radsynth. Synthetic data, not for clinical use. {_e(versions)}</footer>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], row_classes: Sequence[str] | None = None,
           table_id: str = "") -> str:
    head = "".join(f"<th>{_e(header)}</th>" for header in headers)
    classes = row_classes or [""] * len(rows)
    body = "\n".join(f'<tr class="{css}">' + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>"
                     for row, css in zip(rows, classes))
    identifier = f' id="{_e(table_id)}"' if table_id else ""
    return f'<table{identifier}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _figure(figure: Figure | None, caption: str) -> str:
    if figure is None:
        return ""
    return f'<figure class="plot"><img src="{_figure_data_uri(figure)}" alt="{_e(caption)}"><figcaption>{_e(caption)}' \
           "</figcaption></figure>"


def _badge(passed: object, yes: str, no: str) -> str:
    return f'<span class="badge {_status_class(passed)}">{_e(yes if passed else no)}</span>'


def _status_class(passed: object) -> str:
    return "pass" if passed else "fail"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2327; background: #fafafa; }
main { max-width: 1240px; margin: 0 auto; padding: 0 20px 40px; }
.banner { position: sticky; top: 0; z-index: 1; background: #6a1b9a; color: white; padding: 8px 20px; font-weight: 600; }
h1 { margin: 20px 0 6px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
h3 small { color: #666; font-weight: normal; }
nav a { margin-right: 16px; }
.facts, .note { color: #444; } .warning { color: #8d4e00; font-weight: 600; }
.synthetic-tag { font-size: 0.5em; vertical-align: middle; background: #6a1b9a; color: white; padding: 2px 8px;
                 border-radius: 4px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; background: white; border: 1px solid #ddd; padding: 6px; width: min-content; }
figure img { display: block; image-rendering: pixelated; }
figcaption { font-size: 12px; color: #333; margin-top: 4px; min-width: 160px; }
figure.plot { width: auto; } figure.plot img { image-rendering: auto; max-width: 100%; }
.legend span { margin-right: 12px; font-size: 13px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; opacity: 0.8; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13px; background: white; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
th { background: #eceff1; }
tr.pass td { background: #e8f5e9; } tr.fail td { background: #ffebee; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.pass { background: #2e7d32; color: white; } .badge.fail { background: #c62828; color: white; }
.badge.synthetic { background: #6a1b9a; color: white; } .badge.warn { background: #ef6c00; color: white; }
footer { margin-top: 40px; font-size: 12px; color: #666; }
"""


def _page(title: str, body: str) -> str:
    # The marking sits outside the content so that no report, whatever its provenance, can lack it.
    banner = f'<div class="banner" role="alert">SYNTHETIC DATA: {_e(SYNTHETIC_STATEMENT)}</div>'
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
            '<meta name="description" content="Report of a synthetic dataset: not patient data">\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{banner}\n<main>\n{body}\n</main>\n</body>\n</html>\n")
