"""Readers of clip-art and picture collections kept as ``items.jsonl`` + ``images/``
(the shared-datasets layout): openclipart, tuxpaint, gcompris."""
from __future__ import annotations

import re
from pathlib import Path

from cmr.data.readers.base import ReadResult, _from_items_jsonl, _optional, _reader, _require, _str_list, _unique_texts
from cmr.data.schema import Item
from cmr.errors import ConfigError, DataError


# ---------------------------------------------------------------- openclipart

#: Titles that name a collection or a theme rather than the picture (counts in the
#: 6,843-item source: gramastar 1,375, Lemon SVG theme 411, card 226, ...). Such a
#: caption is shared by hundreds of unrelated pictures and teaches nothing.
COLLECTION_TITLES = frozenset(
    t.casefold()
    for t in (
        "gramastar",
        "Lemon SVG theme",
        "card",
        "AIGA_Symbol_Signs",
        "Various Cliparts",
        "Etiquette Icons",
        "SVG Road Signs",
        "gold-theme",
        "R16 sibmission",
        "blueberry - iconset",
        "plastik-icon-theme",
        "Sallite",
    )
)
#: Title prefixes of collections ("Part of the Flat Icon Collection (Wed Aug 25 ...)",
#: "Clipart by Nicu Buculei - jigsaw_red_10"): the rest is a date or a file name.
COLLECTION_TITLE_PREFIXES = ("part of the flat icon collection", "clipart by nicu buculei - ")


#: Descriptions that say nothing about the picture: a bare e-mail address (118 items of
#: one author), a collection note, or the licence boilerplate some authors pasted in.
_NON_DESCRIPTIVE = re.compile(
    r"^\S+@\S+\.\w+$|^part of .* collection$|^this work is hereby released into the public domain",
    re.IGNORECASE,
)


def is_collection_title(title: str | None) -> bool:
    """True when an openclipart title names a collection, not the picture."""
    if not title:
        return False
    t = title.strip().casefold()
    return t in COLLECTION_TITLES or t.startswith(COLLECTION_TITLE_PREFIXES)


@_reader("openclipart")
def read_openclipart(source: Path, keep_collection_titles: bool = False) -> ReadResult:
    """Folder with ``items.jsonl`` (fields id, image, title, description, category,
    also_linked_as, keywords, ...) and ``images/``.

    texts = title, then the description when present, different and descriptive (not an
    e-mail address, collection note or licence text); labels = the
    category plus the categories of the symbolic links (``also_linked_as``), so a
    frog filed under animals and signs_and_symbols has both labels.
    """

    def to_item(row: dict, where: str) -> Item | None:
        title, description = _optional(row, "title", where), _optional(row, "description", where)
        if not keep_collection_titles and is_collection_title(title):
            return None
        if not (title or description):
            raise DataError(where, "title or description present", "both are missing")
        if description and _NON_DESCRIPTIVE.match(description.strip()):
            description = None
        texts = _unique_texts(title, description)
        if not texts and title and not title.strip():
            # a blank title (spaces only) and nothing else: kept without texts, so the
            # "texts non-empty" rule reports it (or drops it, data.on_invalid: drop)
            return Item(id=_require(row, "id", where), split="", image=_optional(row, "image", where))
        if not texts:
            return None  # only a non-descriptive description: no caption to learn from
        labels = {_require(row, "category", where)}
        labels |= {linked.split("/", 1)[0] for linked in _str_list(row, "also_linked_as", where)}
        return Item(
            id=_require(row, "id", where),
            split="",
            texts=texts,
            labels=tuple(sorted(labels)),
            image=_require(row, "image", where),
            meta={"keywords": _str_list(row, "keywords", where), "subcategory": _optional(row, "subcategory", where)},
        )

    return _from_items_jsonl(source, to_item)


# ---------------------------------------------------------------- tuxpaint


@_reader("tuxpaint")
def read_tuxpaint(source: Path, audio_field: str = "sound") -> ReadResult:
    """Tux Paint stamps: texts = ``text_en``, labels = ``category``, image, and audio from
    ``audio_field`` (``sound``: the stamp's sound effect; ``spoken_en``: the spoken
    description). Most stamps have neither, so ``audio`` is often None."""
    if audio_field not in ("sound", "spoken_en"):
        raise ConfigError(f"reader 'tuxpaint': option audio_field={audio_field!r}; allowed: 'sound', 'spoken_en'")
    return _from_items_jsonl(
        source,
        lambda row, where: Item(
            id=_require(row, "id", where),
            split="",
            texts=_unique_texts(_require(row, "text_en", where)),
            labels=(_require(row, "category", where),),
            image=_require(row, "image", where),
            audio=_optional(row, audio_field, where),
            meta={"subcategory": _optional(row, "subcategory", where)},
        ),
    )


# ---------------------------------------------------------------- gcompris


@_reader("gcompris")
def read_gcompris(source: Path) -> ReadResult:
    """GCompris pictures: texts = the non-null of text, title, text2; labels = ``set``;
    audio = ``sound`` (only instruments, farm animals and world music have one)."""
    return _from_items_jsonl(
        source,
        lambda row, where: Item(
            id=_require(row, "id", where),
            split="",
            texts=_unique_texts(*(_optional(row, key, where) for key in ("text", "title", "text2"))),
            labels=(_require(row, "set", where),),
            image=_require(row, "image", where),
            audio=_optional(row, "sound", where),
            meta={"image_license": _optional(row, "image_license", where)},
        ),
    )
