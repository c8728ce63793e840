"""SpecAugment for training log-mels (frequency and time masking)."""

from __future__ import annotations

import torch
import torchaudio

__all__ = ["SpecAugment"]


class SpecAugment(torch.nn.Module):
    """Frequency and time masking of log-mels [B, n_mels, T] (independent masks per example).

    Active only in training mode; in eval mode it returns its input unchanged. Masked cells get the
    example's mean value (Whisper log-mels are not zero-centred, so 0 would be a loud artefact).
    """

    def __init__(self, freq_mask_param: int = 27, time_mask_param: int = 100, num_freq_masks: int = 2,
                 num_time_masks: int = 2) -> None:
        super().__init__()
        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask_param, iid_masks=True)
        self.time = torchaudio.transforms.TimeMasking(time_mask_param, iid_masks=True)
        self.num_freq_masks = num_freq_masks
        self.num_time_masks = num_time_masks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return features
        x = features.unsqueeze(1)  # [B, 1, F, T]: iid masks need a channel dimension
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = x - mean
        for _ in range(self.num_freq_masks):
            x = self.freq(x)
        for _ in range(self.num_time_masks):
            x = self.time(x)
        return (x + mean).squeeze(1)
