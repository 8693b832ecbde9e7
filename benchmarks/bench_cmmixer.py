"""cmmixer pre-training step vs media decoding, in one process.

Step: one fuse-then-separate MAE step (mix, mask, encode, decode both originals, backward, AdamW)
of ``--arch`` on batches of clips already decoded, in clips/s, with peak memory (RSS growth on CPU,
``max_memory_allocated`` on CUDA; bf16 autocast there with ``--amp``). Decoding: the same clips
decoded from their files (video frames with PyAV, audio to a log-mel with torchaudio), with 0 and
with ``--workers`` worker processes, in clips/s. The ratio decode/step says whether decoding
(the cold-cache case, or a data set too large to cache) would starve the step: above 1 it does not.

    .venv/bin/python benchmarks/bench_cmmixer.py                         # the embedded sample, 2 workers
    .venv/bin/python benchmarks/bench_cmmixer.py --clips 16 --steps 2    # quick
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from cmr.data.media import MediaSpec, decode_all
from cmr.data.readers import READERS
from cmr.models.cmmixer import CMMixerMAE, MIXERS, mel_as_image, video_as_image
from cmr.training.engine import _optimizer

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_rate(video, audio, arch: str, mixer: str, batch: int, steps: int, device: str, amp: bool) -> tuple[float, float]:
    """(clips/s, peak MiB) of ``steps`` timed pre-training steps after one warm-up step."""
    gen = torch.Generator().manual_seed(0)
    model = CMMixerMAE(arch).to(device)
    opt = _optimizer(model, torch.nn.Module(), 1e-4, 0.05)
    mix = MIXERS.get(mixer)
    frames, patch = video.shape[1], model.arch.patch_size
    use_amp = amp and device.startswith("cuda")

    def one(rows):
        images = {"video": video_as_image(video[rows].to(device)), "audio": mel_as_image(audio[rows].to(device))}
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = model(mix(images, frames=frames, patch=patch, generator=gen), images, 0.75, gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    rows = [torch.arange(i, i + batch) % video.shape[0] for i in range(0, batch * (steps + 1), batch)]
    one(rows[0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mib()
    t0 = time.perf_counter()
    for r in rows[1:]:
        one(r)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib() - before
    return batch * steps / (time.perf_counter() - t0), peak


def decode_rate(root, items, spec: MediaSpec, workers: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    t0 = time.perf_counter()
    video = decode_all(root, [it.video for it in items], "video", spec, progress=False, workers=workers)
    audio = decode_all(root, [it.audio for it in items], "audio", spec, progress=False, workers=workers)
    return len(items) / (time.perf_counter() - t0), video, audio


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT / "data/raw/av_sample"), help="an av_films-format folder")
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--arch", default="cmmixer-tiny")
    ap.add_argument("--mixer", default="cutmix")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    a = ap.parse_args(argv)
    spec = MediaSpec()
    result = READERS.get("av_films")(Path(a.source))
    items = [it for it in result.items if it.video and it.audio][: a.clips]
    print(f"cmmixer bench: {len(items)} clips of {a.source}, {spec}, {a.arch}, mixer {a.mixer}, batch {a.batch}, "
          f"{a.device}{' bf16' if a.amp else ''}, torch threads {torch.get_num_threads()}")
    rate0, video, audio = decode_rate(result.root, items, spec, 0)
    rate_w, video_w, audio_w = decode_rate(result.root, items, spec, a.workers)
    assert torch.equal(video, video_w) and torch.equal(audio, audio_w), "worker decoding changed the clips"
    step, peak = step_rate(video, audio, a.arch, a.mixer, a.batch, a.steps, a.device, a.amp)
    print(f"pre-training step     {step:8.1f} clips/s   peak memory {peak:8.1f} MiB")
    print(f"decode, 0 workers     {rate0:8.1f} clips/s   ratio to step {rate0 / step:.2f}")
    print(f"decode, {a.workers} workers     {rate_w:8.1f} clips/s   ratio to step {rate_w / step:.2f}   "
          f"({rate_w / rate0:.2f}x the 0-worker rate)")
    verdict = "decoding keeps up with the step" if rate_w >= step else "decoding is the bottleneck: cache the media"
    print(f"verdict: {verdict} (the pipeline decodes once and caches by content hash)")


if __name__ == "__main__":
    sys.exit(main())
