"""An optional perceptual loss for tokenizer training: distances between VGG16 features.

The weights cannot be downloaded at run time, so the loss is used only when they are on disk:
`train.py tokenizer --perceptual-weights vgg16.safetensors --perceptual-weight 0.1`. The file holds
torchvision's `vgg16(weights="IMAGENET1K_V1").features` state dict (keys `features.0.weight`, ...), e.g.
written once on a machine with internet by

    import torchvision, safetensors.torch as st
    m = torchvision.models.vgg16(weights="IMAGENET1K_V1")
    st.save_file({k: v for k, v in m.state_dict().items() if k.startswith("features.")}, "vgg16.safetensors")

The loss compares unit-normalised activations after relu1_2, relu2_2, relu3_3 and relu4_3 (the layers
LPIPS reads, Zhang et al. 2018, arXiv:1801.03924), averaged with equal weights; LPIPS's learned per-channel
weights are not used, which makes this the feature-matching loss of Johnson et al. 2016 (arXiv:1603.08155).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool (Simonyan & Zisserman 2014).
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features`, layer for layer (so its state dict keys match), randomly initialised."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str):
        super().__init__()
        from .tokenizer import load_state_strict

        self.features = vgg16_features()
        load_state_strict(self, weights_path)  # names any missing or misshapen VGG weight
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.mean) / self.std
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))  # unit length per position, as LPIPS
                if i == TAPS[-1]:
                    break  # the conv5 block is loaded (torchvision's file has it) but never run
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> scalar loss."""
        losses = [F.mse_loss(a, b) for a, b in zip(self._taps(recon), self._taps(target))]
        return torch.stack(losses).mean()
