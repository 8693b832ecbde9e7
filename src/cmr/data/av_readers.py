"""Readers for audio and video sources: video <-> audio, picture <-> spoken word or sound.

Registered in :data:`cmr.data.readers.READERS` like the image-text readers (that package
imports this module after its own reader modules). Items carry the media of two modalities and often no text.
Where several items come from one recording or show one picture, the reader names
the group in ``meta["group"]`` and :func:`cmr.data.splits.assign_splits` keeps each
group in one split.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from cmr.data.readers.base import (
    READERS, ReadResult, _check_unique_ids, _from_items_jsonl, _iter_jsonl, _label_set, _optional, _reader,
    _require, _unique_texts,
)
from cmr.data.schema import Item
from cmr.errors import ConfigError, DataError

#: recording -> film: recordings cut from one film share shots (the Sintel trailer and
#: the Sintel excerpt; Big Buck Bunny 0-60 s in av_films and 0-30 s in av_clips_small),
#: so they form one group and can never sit on both sides of a split.
FILM_OF = {
    "sintel_trailer": "sintel",
    "sintel_excerpt": "sintel",
    "bbb_0_60": "big_buck_bunny",
    "bbb_0_30": "big_buck_bunny",
}


def _keep_only(items: list[Item], key: str, wanted: list[str] | None, where: str) -> list[Item]:
    """Items whose ``meta[key]`` is in ``wanted`` (all when None); a name no item has is a ConfigError."""
    if wanted is None:
        return items
    have = sorted({it.meta[key] for it in items})
    unknown = sorted(set(wanted) - set(have))
    if unknown:
        raise ConfigError(f"{where}: {key} {unknown} not in the source; it has {have}")
    return [it for it in items if it.meta[key] in wanted]


def _av_pair(row: dict, where: str) -> Item:
    """One window of a recording: its video (silent) and its own soundtrack."""
    recording = _require(row, "group", where)
    meta = {
        "group": FILM_OF.get(recording, recording),
        "recording": recording,
        "start": _optional(row, "start", where, (int, float)),
        "end": _optional(row, "end", where, (int, float)),
        "source": _optional(row, "source", where),
    }
    transcript = _optional(row, "text", where)
    if transcript:  # GRID: the sentence spoken, kept aside so every item is video <-> audio alike
        meta["transcript"] = transcript
    if row.get("licence") is not None:
        meta["licence"] = _optional(row, "licence", where)
    return Item(
        id=_require(row, "id", where),
        split="",
        video=_require(row, "video", where),
        audio=_require(row, "audio", where),
        meta=meta,
    )


def _read_av(source: Path, recordings: list[str] | None) -> ReadResult:
    result = _from_items_jsonl(source, _av_pair)
    items = _keep_only(result.items, "recording", recordings, f"{source}/items.jsonl")
    return ReadResult(items, result.root, None, [], result.name)


@_reader("av_films")
def read_av_films(source: Path, recordings: list[str] | None = None) -> ReadResult:
    """2 s windows of open films (``items.jsonl`` with id, group/recording, video, audio,
    start, end, text, source, licence): video <-> its own soundtrack, no texts.

    ``meta["group"]`` is the film (:data:`FILM_OF`; both Sintel recordings are one),
    so a recording's windows stay in one split. ``recordings`` keeps only the named
    recordings (e.g. leave out agent327, CC BY-ND). The embedded sample
    ``data/raw/av_sample`` has this format.
    """
    return _read_av(source, recordings)


@_reader("av_clips_small")
def read_av_clips_small(source: Path, recordings: list[str] | None = None) -> ReadResult:
    """av_clips_small (Big Buck Bunny, two short clips, 11 GRID utterances): as
    ``av_films``. GRID's sentence (``text``) goes to ``meta["transcript"]``, not to
    texts: the set is video <-> audio for every item. Each GRID utterance is its own group."""
    return _read_av(source, recordings)


@_reader("gcompris_spoken_words")
def read_gcompris_spoken_words(source: Path, langs: list[str] | None = None) -> ReadResult:
    """Picture <-> the word spoken in one language: image, audio, texts = ``text_en``,
    labels = ``word_id`` (so every recording of a picture matches it at class level),
    ``meta["group"]`` = ``word_id`` (a picture's recordings in all languages stay in one
    split), ``meta["lang"]``. ``langs`` keeps only those languages (e.g. ``["en"]``)."""

    def to_item(row: dict, where: str) -> Item:
        word = _require(row, "word_id", where)
        return Item(
            id=_require(row, "id", where),
            split="",
            texts=_unique_texts(_require(row, "text_en", where)),
            labels=(word,),
            image=_require(row, "image", where),
            audio=_require(row, "audio", where),
            meta={"group": word, "lang": _require(row, "lang", where), "lesson": _optional(row, "group", where),
                  "audio_license": _optional(row, "audio_license", where)},
        )

    result = _from_items_jsonl(source, to_item)
    items = _keep_only(result.items, "lang", langs, f"{source}/items.jsonl")
    return ReadResult(items, result.root, None, _label_set(items), result.name)


@_reader("fsdd_digits")
def read_fsdd_digits(source: Path, seed: int = 0, keep_source_split: bool = True) -> ReadResult:
    """AV-MNIST-style pairs: each handwritten 8x8 digit with one spoken recording of the
    same digit, each recording used once; ``labels`` = the digit (class-level matching).

    Per digit, the recordings paired are all of FSDD's test takes (0-4) plus train takes
    drawn at random (``seed``) up to the number of images (174-183 of 300), shuffled
    (``seed``) onto the images in file order. A pair takes its recording's FSDD split
    (``keep_source_split``; val is then carved from train), else none. Recordings left
    over are not used. Speaker and take in ``meta``.
    """
    path = source / "items.jsonl"
    images: dict[int, list[dict]] = defaultdict(list)
    recordings: dict[int, list[dict]] = defaultdict(list)
    for lineno, row in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        modality = _require(row, "modality", where)
        if modality not in ("image", "audio"):
            raise DataError(where, "modality is image or audio", f"modality is {modality!r}")
        digit = _require(row, "label", where, int)
        _require(row, modality, where)
        (images if modality == "image" else recordings)[digit].append(row | {"where": where})
    items = []
    for digit in sorted(images):
        imgs, recs = images[digit], sorted(recordings[digit], key=lambda r: r["id"])
        rng = np.random.default_rng([seed, digit])
        test = [r for r in recs if r.get("fsdd_split") == "test"]
        train = [r for r in recs if r.get("fsdd_split") != "test"]
        if len(recs) < len(imgs):
            raise DataError(str(path), "at least as many recordings as images per digit",
                            f"digit {digit}: {len(imgs)} images, {len(recs)} recordings")
        n_train = max(0, len(imgs) - len(test))
        chosen = test[: len(imgs)] + [train[i] for i in sorted(rng.choice(len(train), n_train, replace=False))]
        for img, k in zip(imgs, rng.permutation(len(chosen))):
            rec = chosen[k]
            items.append(Item(
                id=f"{digit}/{Path(img['image']).stem}+{Path(rec['audio']).stem}",
                split=_require(rec, "fsdd_split", rec["where"]) if keep_source_split else "",
                labels=(str(digit),),
                image=img["image"],
                audio=rec["audio"],
                meta={"speaker": _optional(rec, "speaker", rec["where"]), "take": _optional(rec, "take", rec["where"], int),
                      "fsdd_split": _optional(rec, "fsdd_split", rec["where"])},
            ))
    if not items:
        raise DataError(str(path), "at least one image-audio pair", "no digit has both images and recordings")
    _check_unique_ids(items, str(path))
    return ReadResult(items, source, None, _label_set(items), source.name)


def _with_audio(result: ReadResult) -> ReadResult:
    """The items of ``result`` that have an audio file: picture <-> sound pairs."""
    items = [it for it in result.items if it.audio is not None]
    if not items:
        raise DataError(str(result.root), "at least one item with audio", f"{len(result.items)} item(s), none with audio")
    return ReadResult(items, result.root, result.features, _label_set(items), result.name)


@_reader("tuxpaint_sounds")
def read_tuxpaint_sounds(source: Path, audio_field: str = "sound") -> ReadResult:
    """The Tux Paint stamps that have audio (``audio_field`` as for ``tuxpaint``: 134 sound
    effects, or 65 spoken descriptions), with their texts and labels: image <-> audio."""
    return _with_audio(READERS.get("tuxpaint")(source, audio_field=audio_field))


@_reader("gcompris_sounds")
def read_gcompris_sounds(source: Path) -> ReadResult:
    """The GCompris pictures that have a sound (instruments, farm animals, world music):
    image <-> audio, with their texts and labels."""
    return _with_audio(READERS.get("gcompris")(source))
