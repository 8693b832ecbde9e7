"""Media decoding (cmr.data.media) on a handful of real files: shapes and dtypes, frames and
samples against PyAV / soundfile / torchaudio read directly, the mel image of known sines,
and the decode cache."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from cmr.data import media
from cmr.data.media import (
    MediaSpec, cached_media, decode_audio, decode_media, decode_still, decode_video, even_indices, log_mel,
    media_cache_key, probe_audio, probe_video,
)
from cmr.errors import ConfigError, DataError, UnknownNameError

FILM = "av_films/video/bbb_0_60_010.mp4"  # 228x128, 16 frames at 8 fps, 2.0 s
GRID = "av_clips_small/video/grid_bbaf2n.mp4"  # 200x160, 36 frames at 12 fps, 3.0 s
FILM_WAV = "av_films/audio/bbb_0_60_010.wav"  # 16 kHz mono, 2.0 s
DIGIT_WAV = "fsdd_digits/audio/0_george_0.wav"  # 8 kHz mono, 0.298 s
STEREO_OGG = "gcompris_spoken_words/audio/de/skin.ogg"  # 44.1 kHz stereo


def _frames_rgb(path) -> list[np.ndarray]:
    """Every frame of the file as uint8 [H, W, 3], decoded by PyAV directly."""
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_spec_defaults_and_rules():
    spec = MediaSpec()
    assert (spec.clip_samples, spec.mel_steps, spec.hop_length, spec.win_length, spec.n_fft) == (32000, 256, 125, 400, 512)
    assert MediaSpec(sample_rate=8000, clip_seconds=1.0, frames=2, size=32).hop_length == 125
    with pytest.raises(ConfigError, match="cannot fill"):
        MediaSpec(sample_rate=100)  # 200 samples for 256 mel steps
    with pytest.raises(ConfigError, match="frames"):
        MediaSpec(frames=0)


@pytest.mark.parametrize("n,t", [(16, 4), (36, 4), (4, 4), (5, 3), (1000, 7)])
def test_even_indices_are_segment_centres(n, t):
    idx = even_indices(n, t)
    assert len(idx) == t and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < n
    for k, i in enumerate(idx):  # index i lies in the k-th of t equal parts of range(n)
        assert k * n / t <= i < (k + 1) * n / t
    assert even_indices(16, 4) == [2, 6, 10, 14]


def test_decode_video_picks_even_frames_and_centre_crops(shared_datasets):
    path = shared_datasets / FILM
    frames = _frames_rgb(path)
    assert len(frames) == 16
    # size = the frame height: no resizing, so the output is exactly the centre crop
    out = decode_video(path, MediaSpec(frames=4, size=128))
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 128, 128)
    left = (228 - 128) // 2
    for k, i in enumerate([2, 6, 10, 14]):
        assert torch.equal(out[k].permute(1, 2, 0), torch.from_numpy(frames[i][:, left : left + 128]))


def test_decode_video_default_shape_and_info(shared_datasets):
    out = decode_video(shared_datasets / GRID, MediaSpec())
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 64, 64)
    assert 0 < out.float().mean() < 255
    info = probe_video(shared_datasets / GRID)
    assert (info.frames, info.width, info.height) == (36, 200, 160) and info.seconds == pytest.approx(3.0, abs=0.05)


def test_video_with_too_few_frames_or_corrupt_is_named(shared_datasets, tmp_path):
    path = shared_datasets / FILM
    with pytest.raises(DataError, match=r"bbb_0_60_010\.mp4: breaks rule 'video has >= 17 decodable frames"):
        decode_video(path, MediaSpec(frames=17))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"cut\.mp4: breaks rule 'video decodes'"):
        decode_video(cut, MediaSpec())


def test_decode_still_repeats_the_centre_crop(shared_datasets):
    from PIL import Image

    path = shared_datasets / "gcompris_spoken_words" / "images" / "skin.jpg"  # 224 x 224
    with Image.open(path) as im:
        pixels = torch.from_numpy(np.array(im.convert("RGB")))
    out = decode_still(path, MediaSpec(frames=3, size=224))
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.uint8
    assert all(torch.equal(out[k].permute(1, 2, 0), pixels) for k in range(3))
    digit = decode_still(shared_datasets / "fsdd_digits" / "images" / "digit_0000.png", MediaSpec())  # 8x8 upscaled
    assert digit.shape == (4, 3, 64, 64) and digit.max() > 100 and digit.min() < 30


def test_decode_audio_crops_pads_resamples_and_mixes_down(shared_datasets):
    import soundfile
    import torchaudio.functional as AF

    spec = MediaSpec()
    wav, rate = soundfile.read(shared_datasets / FILM_WAV, dtype="float32")
    out = decode_audio(shared_datasets / FILM_WAV, spec)
    assert rate == 16000 and out.dtype == torch.float32 and out.shape == (32000,)
    assert torch.equal(out[: len(wav)], torch.from_numpy(wav[:32000]))

    digit, rate = soundfile.read(shared_datasets / DIGIT_WAV, dtype="float32")
    out = decode_audio(shared_datasets / DIGIT_WAV, spec)
    expected = AF.resample(torch.from_numpy(digit), 8000, 16000)
    assert rate == 8000 and len(expected) == 2 * len(digit) < 32000
    assert torch.allclose(out[: len(expected)], expected) and not out[len(expected) :].any()

    stereo, rate = soundfile.read(shared_datasets / STEREO_OGG, dtype="float32")
    assert stereo.ndim == 2 and stereo.shape[1] == 2 and not np.allclose(stereo[:, 0], stereo[:, 1])
    out = decode_audio(shared_datasets / STEREO_OGG, spec)
    expected = AF.resample(torch.from_numpy(stereo.mean(axis=1)), rate, 16000)[:32000]
    assert torch.allclose(out[: len(expected)], expected, atol=1e-6)


def test_formats_soundfile_cannot_read_go_through_pyav(shared_datasets, tmp_path):
    """A real clip re-encoded to AAC in MP4 (libsndfile has no AAC): read by PyAV, same level."""
    import av
    import soundfile

    wav, _ = soundfile.read(shared_datasets / FILM_WAV, dtype="float32")
    m4a = tmp_path / "clip.m4a"
    with av.open(str(m4a), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(wav[None, :], format="flt", layout="mono")
        frame.rate = 16000
        for f in (*stream.encode(frame), *stream.encode(None)):
            out.mux(f)
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(m4a)
    info = probe_audio(m4a)
    assert info.sample_rate == 16000 and info.seconds == pytest.approx(2.0, abs=0.15)
    assert info.rms_dbfs == pytest.approx(probe_audio(shared_datasets / FILM_WAV).rms_dbfs, abs=1.0)
    assert decode_audio(m4a, MediaSpec()).shape == (32000,)


def test_audio_level_matches_the_dataset_probe(shared_datasets):
    """av_films' items.jsonl gives each window's RMS in dBFS, measured with ffmpeg/numpy."""
    import json

    row = next(json.loads(line) for line in (shared_datasets / "av_films" / "items.jsonl").open()
               if '"bbb_0_60_010"' in line)
    assert probe_audio(shared_datasets / FILM_WAV).rms_dbfs == pytest.approx(row["audio_rms_dbfs"], abs=0.2)


def _htk_mel(f_hz: float) -> float:
    return 2595.0 * math.log10(1.0 + f_hz / 700.0)


@pytest.mark.parametrize("freq", [250.0, 1000.0, 3000.0, 6500.0])
def test_log_mel_peak_lands_on_the_sines_mel_band(freq):
    import torchaudio.transforms as AT

    spec = MediaSpec()
    t = torch.arange(spec.clip_samples) / spec.sample_rate
    sine = 0.5 * torch.sin(2 * math.pi * freq * t)
    image = log_mel(sine, spec)
    assert image.shape == (64, 256) and image.dtype == torch.float32
    # naive reference: 64 triangles between 66 points evenly spaced on the HTK mel scale
    edges = np.linspace(_htk_mel(0.0), _htk_mel(spec.sample_rate / 2), spec.n_mels + 2)
    expected_band = int(np.argmin(np.abs(edges[1:-1] - _htk_mel(freq))))
    assert int(image.mean(dim=1).argmax()) == expected_band
    # and the numbers are torchaudio's, called directly
    direct = AT.AmplitudeToDB("power", top_db=80.0)(AT.MelSpectrogram(
        16000, n_fft=512, win_length=400, hop_length=125, n_mels=64)(sine))[:, :256]
    assert torch.allclose(image, direct, atol=1e-4)


def test_log_mel_batch_equals_one_by_one():
    spec = MediaSpec()
    g = torch.Generator().manual_seed(0)
    waves = torch.randn(3, spec.clip_samples, generator=g) * torch.tensor([[1.0], [1e-3], [0.0]])
    batch = log_mel(waves, spec)
    assert batch.shape == (3, 64, 256)
    for k in range(3):  # each clip keeps its own 80 dB floor
        assert torch.allclose(batch[k], log_mel(waves[k], spec), atol=1e-5)
    with pytest.raises(ValueError, match="L = 32000"):
        log_mel(waves[:, :1000], spec)


def test_decode_media_dispatches_by_modality(shared_datasets):
    spec = MediaSpec(frames=2, size=32)
    assert decode_media(shared_datasets, FILM, "video", spec).shape == (2, 3, 32, 32)
    assert decode_media(shared_datasets, "fsdd_digits/images/digit_0000.png", "image", spec).shape == (2, 3, 32, 32)
    assert decode_media(shared_datasets, FILM_WAV, "audio", spec).shape == (64, 64)
    with pytest.raises(UnknownNameError, match="did you mean 'video'"):
        decode_media(shared_datasets, FILM, "vide", spec)
    with pytest.raises(DataError, match=r"no_such\.mp4: breaks rule 'video file exists'"):
        decode_media(shared_datasets, "no_such.mp4", "video", spec)


def test_cached_media_reuses_and_invalidates(shared_datasets, tmp_path, monkeypatch):
    root = tmp_path / "media"
    rels = [f"audio/bbb_0_60_0{k}.wav" for k in (10, 11, 12)]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_datasets / "av_films" / rel, root / rel)
    spec, cache = MediaSpec(), tmp_path / "cache"
    first = cached_media(cache, root, rels, "audio", spec, progress=False)
    assert first.shape == (3, 64, 256) and len(list(cache.iterdir())) == 1
    assert torch.equal(first[1], decode_media(root, rels[1], "audio", spec))

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(media, "decode_all", no_decoding)
        assert torch.equal(cached_media(cache, root, rels, "audio", spec, progress=False), first)
    key = media_cache_key(root, rels, "audio", spec)
    assert media_cache_key(root, rels, "audio", MediaSpec(n_mels=32)) != key
    # same name, other bytes: another key, another entry, other values
    shutil.copyfile(shared_datasets / "av_films" / "audio" / "bbb_0_60_020.wav", root / rels[1])
    assert media_cache_key(root, rels, "audio", spec) != key
    second = cached_media(cache, root, rels, "audio", spec, progress=False)
    assert len(list(cache.iterdir())) == 2
    assert torch.equal(second[0], first[0]) and not torch.equal(second[1], first[1])


def test_worker_processes_give_the_same_tensor_and_errors(shared_datasets, tmp_path):
    rels = [FILM, GRID, "av_films/video/sintel_trailer_001.mp4"]
    alone = cached_media(None, shared_datasets, rels, "video", MediaSpec(), progress=False)
    assert torch.equal(cached_media(None, shared_datasets, rels, "video", MediaSpec(), progress=False, workers=2), alone)
    (tmp_path / "bad.mp4").write_bytes((shared_datasets / FILM).read_bytes()[:3000])
    shutil.copyfile(shared_datasets / FILM, tmp_path / "good.mp4")
    with pytest.raises(DataError, match=r"bad\.mp4: breaks rule 'video decodes'"):
        cached_media(None, tmp_path, ["good.mp4", "bad.mp4"], "video", MediaSpec(), progress=False, workers=1)
