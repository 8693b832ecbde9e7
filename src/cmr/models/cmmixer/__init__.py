""""Video and Audio are Images" (Knowledge-Based Systems 2024): cross-modal mixer + masked
autoencoder + retriever for video <-> audio retrieval.

A clip's frames and its log-mel become two images of one patch grid (:mod:`.as_images`);
a registered mixer fuses them (:mod:`.mixers`); a ViT MAE reconstructs both originals from
a quarter of the mixed tokens (:mod:`.mae`); the pre-trained encoder initialises a
contrastive retriever (:mod:`.retriever`). :mod:`.train` holds the loops, :mod:`.figures`
the reconstruction plot. Architectures are data: ``cmr/models/configs/cmmixer-*.json``.
"""
from cmr.models.cmmixer.as_images import image_as_mel, image_as_video, mel_as_image, video_as_image
from cmr.models.cmmixer.checkpoint import load_cmmixer, save_cmmixer
from cmr.models.cmmixer.mae import CMMixerMAE, MAEOutput, masked_mse, patchify, random_masking, unpatchify
from cmr.models.cmmixer.mixers import MIXERS, MixOutput
from cmr.models.cmmixer.retriever import RETRIEVERS, CMMixerRetriever, input_kind
from cmr.models.cmmixer.train import encode, finetune, pretrain
from cmr.models.cmmixer.vit import CMMIXER_ARCHS, CMMixerArch, ViTEncoder, get_arch

__all__ = ["CMMIXER_ARCHS", "CMMixerArch", "CMMixerMAE", "CMMixerRetriever", "MAEOutput", "MIXERS", "MixOutput",
           "RETRIEVERS", "ViTEncoder", "encode", "finetune", "get_arch", "image_as_mel", "image_as_video",
           "input_kind", "load_cmmixer", "mel_as_image", "masked_mse", "patchify", "pretrain", "random_masking",
           "save_cmmixer", "unpatchify", "video_as_image"]
