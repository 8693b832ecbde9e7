""""Video and Audio are Images" (Knowledge-Based Systems 2024): cross-modal mixer + masked
autoencoder + retriever for video <-> audio retrieval.

A clip's frames and its log-mel become two images of one patch grid (:mod:`.as_images`);
a registered mixer fuses them (:mod:`.mixers`); a ViT MAE reconstructs both originals from
a quarter of the mixed tokens (:mod:`.mae`); the pre-trained encoder initialises a
contrastive retriever (:mod:`.retriever`). :mod:`.train` holds the loops, :mod:`.figures`
the reconstruction plot. Architectures are data: ``cmr/models/configs/cmmixer-*.json``
(:mod:`.archs`). Submodules load on first use of one of their names (:mod:`cmr.lazy`).
"""
from cmr.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "archs": ("CMMIXER_ARCHS", "CMMixerArch", "get_arch"),
    "as_images": ("image_as_mel", "image_as_video", "mel_as_image", "video_as_image"),
    "checkpoint": ("load_cmmixer", "save_cmmixer"),
    "mae": ("CMMixerMAE", "MAEOutput", "masked_mse", "patchify", "random_masking", "unpatchify"),
    "mixers": ("MIXERS", "MixOutput"),
    "retriever": ("RETRIEVERS", "CMMixerRetriever", "input_kind"),
    "train": ("encode", "finetune", "pretrain"),
    "vit": ("ViTEncoder",),
})
