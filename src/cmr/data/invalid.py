"""What to do with source rows that break the per-item data rules: fail (the default) or drop.

``data.on_invalid: fail`` keeps every item, and the validate stage stops the
pipeline at the first bad row, naming the source file and line. ``drop`` applies the
per-item rules at ingest instead, where they can still be acted on:

* a text shorter than ``data.min_text_chars``, longer than ``data.max_text_chars``, or
  blank is removed from its item (the item's other texts stay);
* an item left without texts (that had texts, or has no precomputed features to stand
  in for them), or whose media file is missing, is removed.

Every removal is reported (source file:line, item id, rule, value), in the prepared
folder's ``dropped.json`` and as a count in the log, so a drop is never silent. Rules
about the whole dataset (unique ids, no leakage across splits) and image decoding are
still the validate stage's, and still fail.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cmr.data.schema import Item
from cmr.data.splits import MEDIA_FIELDS

ON_INVALID = ("fail", "drop")


def _text_rule(text: str, min_chars: int, max_chars: int) -> str | None:
    """The rule ``text`` breaks, or None."""
    if not text.strip():
        return "texts non-blank"
    if len(text) < min_chars:
        return f"text length >= {min_chars}"
    if len(text) > max_chars:
        return f"text length <= {max_chars}"
    return None


def drop_invalid(items: list[Item], root: Path, min_chars: int, max_chars: int,
                 origins: dict[str, str] | None = None) -> tuple[list[Item], list[dict]]:
    """(the items that keep, with their bad texts removed; one report row per removal).

    A report row is ``{"where", "id", "dropped": "text" | "item", "rule", "value"}``;
    ``where`` is the item's source file:line from ``origins`` (its id when unknown).
    """
    kept, report = [], []
    for it in items:
        where = (origins or {}).get(it.id, it.id)

        def note(what: str, rule: str, value: str) -> None:
            report.append({"where": where, "id": it.id, "dropped": what, "rule": rule, "value": value[:120]})

        texts = []
        for t in it.texts:
            rule = _text_rule(t, min_chars, max_chars)
            if rule:
                note("text", rule, f"{len(t)} chars: {t!r}")
            else:
                texts.append(t)
        missing = [f for f in MEDIA_FIELDS if getattr(it, f) and not (Path(root) / getattr(it, f)).is_file()]
        if missing:
            note("item", f"{missing[0]} file exists", f"{getattr(it, missing[0])}: no such file under {root}")
        elif not texts and (it.texts or it.feature_row is None):
            note("item", "texts non-empty", "no text left" if it.texts else "the item has no text")
        else:
            kept.append(dataclasses.replace(it, texts=tuple(texts)))
    return kept, report
