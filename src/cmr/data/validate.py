"""Data checks on a prepared dataset, run as a great-expectations suite.

The items become a DataFrame with one row per item (index = line number in
``items.jsonl``) and one column per checked property (``image_decodes``,
``text_chars_max``, ...; None where a check does not apply to the item, which
great-expectations skips). Opening images, hashing content and the like happen here
in Python; great-expectations holds the rules and reports which rows break them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cmr.data.prepare import Prepared
from cmr.data.schema import SPLITS, Item
from cmr.data.splits import leaking_items
from cmr.errors import DataError
from cmr.progress import progress

#: examples of breaking rows kept per expectation in the report
MAX_EXAMPLES = 20


@dataclass(frozen=True)
class Check:
    rule: str
    field: str  # the Item field the rule is about
    column: str
    kind: str  # "unique", "in_set" or "between"
    kwargs: dict


def _decodes_image(path: Path) -> tuple[bool, str]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # open() reads only the header; load() decodes every pixel
        return True, ""
    except Exception as e:  # noqa: BLE001 - any decoder failure means "does not decode"
        return False, f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class MediaBounds:
    """What audio and video files must meet, beyond decoding (checked only for the
    modalities a dataset has). Defaults pass every shared dataset except truly silent
    files (tuxpaint's wombat.ogg is digital silence)."""

    min_video_frames: int = 4  # MediaSpec.frames: decode_video needs this many frames
    min_seconds: float = 0.1  # audio and video duration bounds
    max_seconds: float = 600.0
    min_sample_rate: int = 4000  # Hz; tuxpaint holds 5 kHz sound effects, FSDD is 8 kHz
    max_sample_rate: int = 192000
    min_rms_dbfs: float = -60.0  # loudness floor; the quietest real clips here are -51 to -54 dBFS


def _probe_audio(path: Path) -> tuple[bool, str, dict]:
    from cmr.data.media import probe_audio

    try:
        info = probe_audio(path)
    except DataError as e:
        return False, e.detail, {}
    return True, "", {"seconds": round(info.seconds, 3), "sample_rate": info.sample_rate,
                      "rms_dbfs": round(info.rms_dbfs, 1)}


def _probe_video(path: Path) -> tuple[bool, str, dict]:
    from cmr.data.media import probe_video

    try:
        info = probe_video(path)
    except DataError as e:
        return False, e.detail, {}
    return True, "", {"frames": info.frames, "seconds": round(info.seconds, 3)}


#: media field -> (probe: path -> (decodes, why not, measured values), measured value names)
PROBES = {
    "image": (lambda path: (*_decodes_image(path), {}), ()),
    "audio": (_probe_audio, ("seconds", "sample_rate", "rms_dbfs")),
    "video": (_probe_video, ("frames", "seconds")),
}
#: how a measured value reads in a failure message
_UNITS = {"seconds": "{} s", "sample_rate": "{} Hz", "rms_dbfs": "RMS {} dBFS", "frames": "{} decodable frames"}


def _media_columns(items: list[Item], root: Path, field: str) -> tuple[dict[str, list], dict[str, list]]:
    """``<field>_exists``, ``<field>_decodes`` and one column per measured value (None
    where the item has no such file, or it does not decode), with a detail per cell."""
    probe, measured = PROBES[field]
    names = [f"{field}_exists", f"{field}_decodes"] + [f"{field}_{m}" for m in measured]
    cols: dict[str, list] = {c: [] for c in names}
    detail: dict[str, list] = {c: [] for c in names}
    for it in progress(items, len(items), f"checking {field} files", unit="item"):
        rel = getattr(it, field)
        values: dict[str, object] = {}
        why = rel or ""
        if rel is not None:
            path = root / rel
            values["exists"] = path.is_file()
            if values["exists"]:
                good, reason, found = probe(path)
                values["decodes"] = good
                values |= found
                why = f"{rel}: {reason}" if reason else rel
            else:
                why = f"{rel}: no such file under {root}"
        for c in names:
            key = c.removeprefix(f"{field}_")
            cols[c].append(values.get(key))
            unit = _UNITS.get(key)
            detail[c].append(f"{rel}: {unit.format(values[key])}" if unit and values.get(key) is not None else why)
    return cols, detail


def _feature_columns(p: Prepared, modalities: list[str]) -> tuple[dict[str, list], dict[str, list]]:
    """Per item: row in range, all modalities finite, and each modality's dim (-1: no array)."""
    features = p.features or {}
    n_rows = min((len(a) for a in features.values()), default=0)
    cols: dict[str, list] = {"feature_row_valid": [], "features_finite": []}
    cols |= {f"{m}_feature_dim": [] for m in modalities}
    detail: dict[str, list] = {"feature_row_valid": [], "features_finite": []}
    for it in p.items:
        r = it.feature_row
        if r is None:
            for c in cols:
                cols[c].append(None)
            detail["feature_row_valid"].append(""), detail["features_finite"].append("")
            continue
        valid = bool(features) and 0 <= r < n_rows
        cols["feature_row_valid"].append(valid)
        detail["feature_row_valid"].append(f"feature_row {r}, arrays have {n_rows} rows")
        bad = [m for m, a in features.items() if valid and not np.isfinite(a[r]).all()]
        cols["features_finite"].append(not bad if valid else None)
        detail["features_finite"].append(f"non-finite values in {bad}" if bad else "")
        for m in modalities:
            a = features.get(m)
            cols[f"{m}_feature_dim"].append(int(a.shape[1]) if a is not None and a.ndim == 2 else -1)
    return cols, detail


def items_frame(p: Prepared, feature_modalities: list[str]) -> tuple[pd.DataFrame, dict[str, list]]:
    """The checked properties per item (index = line number) and a detail text per cell."""
    items = p.items
    root = Path(p.root)
    text_features = "text" in feature_modalities  # declared, even if the array went missing
    cols: dict[str, list] = {"id": [it.id for it in items], "split": [it.split for it in items]}
    detail: dict[str, list] = {"id": [it.id for it in items], "split": [it.split for it in items]}
    for field in PROBES:
        media_cols, media_detail = _media_columns(items, root, field)
        cols |= media_cols
        detail |= media_detail
    # Precomputed text features stand in for the texts of feature-only datasets.
    needs_text = [not (text_features and it.feature_row is not None) for it in items]
    cols["text_nonempty"] = [
        (bool(it.texts) and all(t.strip() for t in it.texts)) if need else None for it, need in zip(items, needs_text)
    ]
    detail["text_nonempty"] = [repr(list(it.texts)) for it in items]
    cols["text_chars_min"] = [min(map(len, it.texts)) if it.texts else None for it in items]
    detail["text_chars_min"] = [repr(min(it.texts, key=len)) if it.texts else "" for it in items]
    cols["text_chars_max"] = [max(map(len, it.texts)) if it.texts else None for it in items]
    detail["text_chars_max"] = [
        f"{len(t)} chars: {t[:60]!r}..." if it.texts and (t := max(it.texts, key=len)) else "" for it in items
    ]
    known = set(p.label_set)
    cols["labels_known"] = [set(it.labels) <= known for it in items]
    detail["labels_known"] = [f"unknown {sorted(set(it.labels) - known)}" for it in items]
    leaks = leaking_items(items, root, p.features)
    cols["leakage_free"] = [i not in leaks for i in range(len(items))]
    detail["leakage_free"] = [f"{leaks[i]} is in more than one split" if i in leaks else "" for i in range(len(items))]
    feat_cols, feat_detail = _feature_columns(p, feature_modalities)
    cols |= feat_cols
    detail |= feat_detail
    for c in feat_cols:
        detail.setdefault(c, [f"dim {v}" for v in feat_cols[c]])
    index = pd.RangeIndex(1, len(items) + 1, name="line")
    frame = pd.DataFrame({c: pd.Series(v, index=index, dtype=object) for c, v in cols.items()}, index=index)
    return frame, detail


def _media_checks(field: str, present: bool, media: MediaBounds) -> list[Check]:
    """Existence (and decoding, for image and audio) always, as the report always listed
    them; decoding of video and the measured bounds only when the dataset has ``field``."""
    out = [Check(f"{field} file exists", field, f"{field}_exists", "in_set", {"value_set": [True]})]
    if field != "video" or present:
        out.append(Check(f"{field} decodes", field, f"{field}_decodes", "in_set", {"value_set": [True]}))
    if not present:
        return out
    seconds = {"min_value": media.min_seconds, "max_value": media.max_seconds}
    if field == "audio":
        rate = {"min_value": media.min_sample_rate, "max_value": media.max_sample_rate}
        out += [
            Check(f"audio duration in [{media.min_seconds}, {media.max_seconds}] s", field, "audio_seconds", "between", seconds),
            Check(f"audio sample rate in [{media.min_sample_rate}, {media.max_sample_rate}] Hz", field,
                  "audio_sample_rate", "between", rate),
            Check(f"audio not silent (RMS >= {media.min_rms_dbfs} dBFS)", field, "audio_rms_dbfs", "between",
                  {"min_value": media.min_rms_dbfs}),
        ]
    if field == "video":
        out += [
            Check(f"video has >= {media.min_video_frames} frames", field, "video_frames", "between",
                  {"min_value": media.min_video_frames}),
            Check(f"video duration in [{media.min_seconds}, {media.max_seconds}] s", field, "video_seconds", "between", seconds),
        ]
    return out


def checks(min_chars: int, max_chars: int, feature_dims: dict[str, int], modalities: set[str],
           media: MediaBounds = MediaBounds()) -> list[Check]:
    """The rules, in the order a failure is reported. ``modalities``: those the dataset
    has ("image", "audio", "video", "text"); text rules apply only when it has texts."""
    out = [
        Check("ids unique", "id", "id", "unique", {}),
        Check("split in train/val/test", "split", "split", "in_set", {"value_set": list(SPLITS)}),
    ]
    for field in ("image", "audio", "video"):
        out += _media_checks(field, field in modalities, media)
    if "text" in modalities:
        out += [
            Check("texts non-empty", "texts", "text_nonempty", "in_set", {"value_set": [True]}),
            Check(f"text length >= {min_chars}", "texts", "text_chars_min", "between", {"min_value": min_chars}),
            Check(f"text length <= {max_chars}", "texts", "text_chars_max", "between", {"max_value": max_chars}),
        ]
    out += [
        Check("labels in label_set", "labels", "labels_known", "in_set", {"value_set": [True]}),
        Check("no content shared across splits", "split", "leakage_free", "in_set", {"value_set": [True]}),
        Check("feature_row in range", "feature_row", "feature_row_valid", "in_set", {"value_set": [True]}),
        Check("features finite", "feature_row", "features_finite", "in_set", {"value_set": [True]}),
    ]
    for m, d in sorted(feature_dims.items()):
        out.append(
            Check(f"{m} feature dim == {d}", "feature_row", f"{m}_feature_dim", "between", {"min_value": d, "max_value": d})
        )
    return out


def _run_suite(frame: pd.DataFrame, rules: list[Check]) -> dict[str, dict]:
    """Validate ``frame`` with great-expectations; column -> result dict."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas("cmr")
        .add_dataframe_asset("items")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    make = {
        "unique": gx.expectations.ExpectColumnValuesToBeUnique,
        "in_set": gx.expectations.ExpectColumnValuesToBeInSet,
        "between": gx.expectations.ExpectColumnValuesToBeBetween,
    }
    suite = gx.ExpectationSuite(name="cmr_items")
    for c in rules:
        suite.add_expectation(make[c.kind](column=c.column, **c.kwargs))
    result = batch.validate(suite, result_format="COMPLETE")
    out = {}
    for r in result.results:
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"expectation on {r.expectation_config.kwargs['column']}: {r.exception_info}")
        out[r.expectation_config.kwargs["column"]] = {
            "expectation": r.expectation_config.type,
            "success": bool(r.success),
            "unexpected_count": int(r.result.get("unexpected_count") or 0),
            # with a named index GX gives {"line": n, <column>: value} per row, else n
            "rows": [int(i["line"] if isinstance(i, dict) else i) for i in r.result.get("unexpected_index_list") or ()],
        }
    return out


def modalities_of(p: Prepared, feature_dims: dict[str, int]) -> set[str]:
    """The modalities a prepared dataset has: media fields some item names, and "text"
    when some item has texts or text features are declared."""
    present = {f for f in ("image", "audio", "video") if any(getattr(it, f) is not None for it in p.items)}
    return present | ({"text"} if any(it.texts for it in p.items) or "text" in feature_dims else set())


def validate_prepared(p: Prepared, min_chars: int, max_chars: int, media: MediaBounds = MediaBounds()) -> dict:
    """Run every check; returns a JSON-ready report::

        {"success": bool, "n_items": N, "n_failures": total breaking cells,
         "expectations": [{"rule", "field", "column", "expectation", "success",
                           "unexpected_count", "unexpected": [{"row", "id", "value"}, ...]}],
         "not_checked": []}

    ``row`` is the line number of the item in ``items.jsonl``.
    """
    if p.features:  # every row is checked: read each array once, not row by row from disk
        p = replace(p, features={m: np.asarray(a) for m, a in p.features.items()})
    # declared dims (dataset.json) win; an array nobody declared is checked against itself
    feature_dims = {m: int(d) for m, d in (p.info.get("feature_dims") or {}).items()}
    for m, a in (p.features or {}).items():
        feature_dims.setdefault(m, int(a.shape[1]) if a.ndim == 2 else -1)
    frame, detail = items_frame(p, sorted(feature_dims))
    rules = checks(min_chars, max_chars, feature_dims, modalities_of(p, feature_dims), media)
    results = _run_suite(frame, rules)
    expectations = []
    for c in rules:
        r = results[c.column]
        unexpected = [
            {"row": row, "id": str(frame.at[row, "id"]), "value": str(detail[c.column][row - 1])}
            for row in r["rows"][:MAX_EXAMPLES]
        ]
        expectations.append(
            {"rule": c.rule, "field": c.field, "column": c.column, "expectation": r["expectation"],
             "success": r["success"], "unexpected_count": r["unexpected_count"], "unexpected": unexpected}
        )
    return {
        "success": all(e["success"] for e in expectations),
        "n_items": len(p.items),
        "n_failures": sum(e["unexpected_count"] for e in expectations),
        "expectations": expectations,
        "not_checked": [],  # kept for readers of older reports: every check now runs
    }


def raise_on_failure(report: dict, items_path: str | Path, origins: dict[str, str] | None = None) -> None:
    """Raise DataError for the failure on the lowest line of ``items_path`` (first rule
    on ties), naming file:line, the field and the rule, with the count of all failures.
    With ``origins`` (item id -> source file:line), the user's source line is named instead."""
    if report["success"]:
        return
    failed = [e for e in report["expectations"] if not e["success"]]
    candidates = [(u["row"], k, e, u) for k, e in enumerate(failed) for u in e["unexpected"][:1]]
    if not candidates:  # a failure without row examples (should not happen for column checks)
        e = failed[0]
        raise DataError(str(items_path), e["rule"], f"field '{e['field']}': {report['n_failures']} failure(s) in all")
    row, _, e, u = min(candidates, key=lambda c: (c[0], c[1]))
    rules = ", ".join(f"'{f['rule']}' x{f['unexpected_count']}" for f in failed)
    raise DataError(
        (origins or {}).get(u["id"]) or f"{items_path}:{row}",
        e["rule"],
        f"field '{e['field']}' of item {u['id']!r} ({u['value']}); "
        f"{report['n_failures']} failure(s) in all: {rules}",
    )
