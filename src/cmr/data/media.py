"""Video and audio as images: the decoding contract of the cross-modal mixer.

Every modality becomes a small stack of pictures of one fixed size, so one image
backbone can read all of them ("Video and Audio are Images"):

* video: ``T = spec.frames`` frames evenly spaced over the clip, each ``S x S``
  (``S = spec.size``): uint8 ``[T, 3, S, S]``;
* image: the picture repeated ``T`` times (a still "video", for image <-> audio);
* audio: a log-mel spectrogram of ``spec.clip_seconds`` of mono audio at
  ``spec.sample_rate``: float32 ``[n_mels, T * S]`` dB, i.e. ``T`` windows of ``S``
  time steps, which a model tiles as ``T`` images of ``n_mels x S``.

Decoders raise :class:`cmr.errors.DataError` naming the file and the rule it breaks.
:func:`cached_media` decodes a whole split once and keeps the tensor on disk under a
key made of the files' content hashes and the spec.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cmr.errors import ConfigError, DataError
from cmr.io import atomic_path
from cmr.registry import Registry

#: an audio reader: path -> (float32 [C, L] in [-1, 1], sample rate in Hz)
AudioReader = Callable[[Path], tuple[np.ndarray, int]]


@dataclass(frozen=True)
class MediaSpec:
    """How media become images: ``frames`` windows (T) of ``size`` x ``size`` pixels (S);
    audio is ``clip_seconds`` at ``sample_rate`` Hz, as ``n_mels`` mel bins x T*S steps."""

    frames: int = 4
    size: int = 64
    sample_rate: int = 16000
    clip_seconds: float = 2.0
    n_mels: int = 64

    def __post_init__(self):
        for name in ("frames", "size", "sample_rate", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MediaSpec.{name}={value!r} must be a positive integer")
        if not self.clip_seconds > 0:
            raise ConfigError(f"MediaSpec.clip_seconds={self.clip_seconds!r} must be > 0")
        if self.clip_samples < self.mel_steps:
            raise ConfigError(
                f"MediaSpec: {self.clip_samples} audio samples cannot fill {self.mel_steps} mel time steps "
                f"(frames*size); raise clip_seconds or sample_rate"
            )

    @property
    def clip_samples(self) -> int:
        """Samples of one audio clip: round(sample_rate * clip_seconds)."""
        return round(self.sample_rate * self.clip_seconds)

    @property
    def mel_steps(self) -> int:
        """Time steps of the mel image: frames * size."""
        return self.frames * self.size

    @property
    def hop_length(self) -> int:
        """Samples between mel frames: clip_samples // mel_steps (125 = 7.8 ms at the defaults).

        With centred frames the STFT of ``clip_samples`` gives ``1 + clip_samples // hop``
        >= mel_steps + 1 frames; :func:`log_mel` keeps the first ``mel_steps``, so the
        image always has exactly ``frames * size`` columns, frame k centred at k * hop.
        """
        return self.clip_samples // self.mel_steps

    @property
    def win_length(self) -> int:
        """25 ms analysis window (400 samples at 16 kHz), the usual speech/audio choice."""
        return max(2, round(0.025 * self.sample_rate))

    @property
    def n_fft(self) -> int:
        """The next power of two >= the window (512 at 16 kHz)."""
        return 1 << (self.win_length - 1).bit_length()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- pictures


def _square(image, size: int) -> np.ndarray:
    """PIL image -> uint8 [S, S, 3]: short side resized to S (bilinear, antialiased), centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _to_tensor(pictures: list[np.ndarray]) -> torch.Tensor:
    """list of uint8 [S, S, 3] -> uint8 [T, 3, S, S]."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()


def even_indices(n: int, t: int) -> list[int]:
    """``t`` indices spread evenly over ``range(n)``: the centres of t equal parts
    (n=16, t=4 -> 2, 6, 10, 14)."""
    return [((2 * k + 1) * n) // (2 * t) for k in range(t)]


def _require_file(path: Path, modality: str) -> None:
    if not path.is_file():
        raise DataError(str(path), f"{modality} file exists")


def _decode_all_frames(path: Path, keep: Callable) -> tuple[list, float, tuple[int, int]]:
    """``keep(frame)`` of every frame of the first video stream (as a PIL image), the
    stream's duration in s and its (width, height). Only what ``keep`` returns is held,
    so a long video costs what ``keep`` keeps, not its full-size frames."""
    import av

    _require_file(path, "video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(str(path), "video decodes", "the file has no video stream")
            stream = container.streams.video[0]
            kept = [keep(frame.to_image()) for frame in container.decode(stream)]
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000  # AV_TIME_BASE
            else:
                seconds = len(kept) / float(stream.average_rate or 1)
            size = (stream.codec_context.width, stream.codec_context.height)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(str(path), "video decodes", f"{type(e).__name__}: {e}") from None
    return kept, seconds, size


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # decodable frames
    seconds: float
    width: int
    height: int


def probe_video(path: str | Path) -> VideoInfo:
    """Decode every frame of ``path`` and describe it; DataError if it does not decode."""
    frames, seconds, (w, h) = _decode_all_frames(Path(path), lambda image: None)
    return VideoInfo(len(frames), seconds, w, h)


def decode_video(path: str | Path, spec: MediaSpec) -> torch.Tensor:
    """uint8 [T, 3, S, S]: T frames evenly spaced over the clip (:func:`even_indices`),
    short side resized to S, centre-cropped.

    Every frame is decoded and made S x S (the count is known only at the end); fewer
    decodable frames than T is a DataError.
    """
    frames, _, _ = _decode_all_frames(Path(path), lambda image: _square(image, spec.size))
    if len(frames) < spec.frames:
        raise DataError(str(path), f"video has >= {spec.frames} decodable frames (MediaSpec.frames)",
                        f"{len(frames)} decoded")
    return _to_tensor([frames[i] for i in even_indices(len(frames), spec.frames)])


def decode_still(path: str | Path, spec: MediaSpec) -> torch.Tensor:
    """uint8 [T, 3, S, S]: one picture (short side to S, centre crop) repeated T times."""
    from PIL import Image

    _require_file(Path(path), "image")
    try:
        with Image.open(path) as im:
            picture = _square(im, spec.size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(str(path), "image decodes", f"{type(e).__name__}: {e}") from None
    return _to_tensor([picture]).expand(spec.frames, -1, -1, -1).contiguous()


# ---------------------------------------------------------------- audio


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return data.T, int(rate)


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV (its own FFmpeg): AAC, MP3, Opus in MP4/WebM, ..."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        stream = container.streams.audio[0]
        # planar float keeps every channel apart, at the stream's own rate: mixing down and
        # resampling are done by decode_audio, the same way for every reader
        to_float = av.AudioResampler(format="fltp")
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
        chunks += [f.to_ndarray() for f in to_float.resample(None)]
        rate = stream.rate
    if not chunks:
        raise ValueError("no audio samples decoded")
    return np.concatenate(chunks, axis=1).astype(np.float32), int(rate)


#: tried in order; the first that reads the file wins (soundfile: WAV/FLAC/Ogg; PyAV: the rest)
AUDIO_READERS: tuple[tuple[str, AudioReader], ...] = (("soundfile", _read_soundfile), ("pyav", _read_pyav))


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(float32 [C, L] samples in [-1, 1], sample rate in Hz); DataError when no reader can
    read it or it holds no samples."""
    path = Path(path)
    _require_file(path, "audio")
    failures = []
    for name, read in AUDIO_READERS:
        try:
            data, rate = read(path)
        except Exception as e:  # noqa: BLE001 - each library has its own error types; all mean "cannot read"
            failures.append(f"{name}: {type(e).__name__}: {str(e).strip()[:120]}")
            continue
        if data.shape[1] == 0:
            raise DataError(str(path), "audio decodes", "the file holds no samples")
        return data, rate
    raise DataError(str(path), "audio decodes", "; ".join(failures))


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int  # Hz, as stored
    channels: int
    seconds: float
    rms_dbfs: float  # RMS of all samples, dB re full scale (1.0); -200 for digital silence


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB re full scale: a full-scale sine is -3.0, silence -200 (floor 1e-10)."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20 * math.log10(max(rms, 1e-10))


def probe_audio(path: str | Path) -> AudioInfo:
    data, rate = read_audio(path)
    return AudioInfo(rate, data.shape[0], data.shape[1] / rate, rms_dbfs(data))


def decode_audio(path: str | Path, spec: MediaSpec) -> torch.Tensor:
    """float32 [round(sample_rate * clip_seconds)]: mono (mean of the channels), resampled
    to ``spec.sample_rate`` (``torchaudio.functional.resample``), its first clip_seconds,
    zero-padded at the end when shorter."""
    import torchaudio.functional as AF

    data, rate = read_audio(path)
    mono = torch.from_numpy(data).mean(dim=0)
    if rate != spec.sample_rate:
        mono = AF.resample(mono, rate, spec.sample_rate)
    out = torch.zeros(spec.clip_samples, dtype=torch.float32)
    n = min(len(mono), spec.clip_samples)
    out[:n] = mono[:n]
    return out


@functools.lru_cache(maxsize=8)
def _mel_transforms(spec: MediaSpec):
    import torchaudio.transforms as AT

    mel = AT.MelSpectrogram(
        sample_rate=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length,
        hop_length=spec.hop_length, n_mels=spec.n_mels, center=True, power=2.0,
    )
    # 80 dB below each clip's peak is the floor (the usual top_db): quieter detail is noise
    return mel, AT.AmplitudeToDB(stype="power", top_db=80.0)


def log_mel(wave: torch.Tensor, spec: MediaSpec) -> torch.Tensor:
    """Log-mel image of a clip: wave [L] -> float32 [n_mels, frames*size] dB, or
    [B, L] -> [B, n_mels, frames*size]; L must be ``spec.clip_samples``.

    torchaudio ``MelSpectrogram`` (HTK mel scale, 0 Hz to Nyquist, power 2, centred
    Hann windows of :attr:`MediaSpec.win_length`, hop :attr:`MediaSpec.hop_length`)
    then ``AmplitudeToDB`` with an 80 dB floor per clip; the last STFT frame is dropped
    so there are exactly frames*size time steps.
    """
    if wave.shape[-1] != spec.clip_samples or wave.ndim not in (1, 2):
        raise ValueError(f"log_mel: wave must be [L] or [B, L] with L = {spec.clip_samples}, got {tuple(wave.shape)}")
    mel, to_db = _mel_transforms(spec)
    power = mel(wave.float())[..., : spec.mel_steps]
    # [.., 1, n_mels, W]: AmplitudeToDB takes its top_db floor over the last three
    # dims, so each clip of a batch gets its own floor, as when decoded alone
    return to_db(power.unsqueeze(-3)).squeeze(-3)


def decode_audio_image(path: str | Path, spec: MediaSpec) -> torch.Tensor:
    """float32 [n_mels, frames*size]: :func:`log_mel` of :func:`decode_audio`."""
    return log_mel(decode_audio(path, spec), spec)


# ---------------------------------------------------------------- by modality, cached

MEDIA_DECODERS: Registry[Callable[[Path, MediaSpec], torch.Tensor]] = Registry("media decoder")
MEDIA_DECODERS.register("image")(decode_still)
MEDIA_DECODERS.register("video")(decode_video)
MEDIA_DECODERS.register("audio")(decode_audio_image)


def decode_media(root: str | Path, rel: str, modality: str, spec: MediaSpec) -> torch.Tensor:
    """The ``modality`` decoder (image/video: uint8 [T, 3, S, S]; audio: float32
    [n_mels, T*S]) applied to ``root / rel``."""
    return MEDIA_DECODERS.get(modality)(Path(root) / rel, spec)


def media_cache_key(root: str | Path, rels: Sequence[str], modality: str, spec: MediaSpec) -> str:
    """SHA-256 (24 hex) over the spec, the modality and each file's path and content hash."""
    from cmr.data.splits import file_sha256

    h = hashlib.sha256(json.dumps({"spec": spec.to_json(), "modality": modality}, sort_keys=True).encode())
    for rel in rels:
        path = Path(root) / rel
        _require_file(path, modality)
        h.update(f"{rel}\x00{file_sha256(path)}\n".encode())
    return h.hexdigest()[:24]


class _Decoded(torch.utils.data.Dataset):
    """Item i: ("ok", tensor) or ("error", where, rule, detail) for ``rels[i]``: a DataError
    cannot cross a worker process as itself, so it travels as its parts."""

    def __init__(self, root: Path, rels: Sequence[str], modality: str, spec: MediaSpec):
        self.root, self.rels, self.modality, self.spec = root, list(rels), modality, spec

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int):
        try:
            return ("ok", decode_media(self.root, self.rels[i], self.modality, self.spec))
        except DataError as e:
            return ("error", e.where, e.rule, e.detail)


@contextlib.contextmanager
def _one_torch_thread():
    """Intra-op threads only add overhead to one small STFT or resize: measured on a loaded
    2-core machine, a 2 s mel image took 57 ms with 2 threads and 1.8 ms with one.
    Parallelism comes from worker processes (DataLoader workers run one thread each)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def decode_all(root: str | Path, rels: Sequence[str], modality: str, spec: MediaSpec,
               progress: bool = True, workers: int = 0) -> torch.Tensor:
    """[N, ...] stacked :func:`decode_media` outputs, in order; ``workers`` > 0 decodes in
    that many processes (a torch DataLoader). The progress bar (counts, files/s) shows
    on a terminal only."""
    from tqdm.auto import tqdm

    MEDIA_DECODERS.get(modality)  # an unknown modality fails before any worker starts
    data = _Decoded(Path(root), rels, modality, spec)
    loader = data if workers <= 0 else torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=workers)
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(data), desc=f"decoding {modality}", unit="file", disable=not (progress and sys.stderr.isatty()))
    with bar, (_one_torch_thread() if workers <= 0 else contextlib.nullcontext()):
        for result in loader:
            if result[0] == "error":
                raise DataError(*result[1:])
            out.append(result[1])
            bar.update(1)
    if not out:
        raise DataError(str(root), f"at least one {modality} file to decode")
    return torch.stack(out)


def cached_media(cache_dir: str | Path | None, root: str | Path, rels: Sequence[str], modality: str,
                 spec: MediaSpec, progress: bool = True, workers: int = 0) -> torch.Tensor:
    """:func:`decode_all`, memoised under ``cache_dir/media_<modality>_<key>.pt`` (key:
    :func:`media_cache_key`, so a changed file or spec is a new entry and a stale one is
    never read); written atomically. ``cache_dir`` None: no cache."""
    if cache_dir is None:
        return decode_all(root, rels, modality, spec, progress, workers)
    path = Path(cache_dir) / f"media_{modality}_{media_cache_key(root, rels, modality, spec)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    out = decode_all(root, rels, modality, spec, progress, workers)
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return out
