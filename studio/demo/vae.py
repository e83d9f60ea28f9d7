"""Pictures in and out of the demo model's VAE: as the tensors it reads, and through it and back.

Generated pictures decode through the VAE, so what a picture looks like after `vae_roundtrip` is what a generation of
it at best looks like; the judge and the identity encoder train on such reconstructions and are measured on them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image


def to_tensor(images) -> torch.Tensor:
    """RGB pictures (all one size) -> a float tensor [N, 3, H, W] in [-1, 1], as the VAE reads them."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def vae_roundtrip(vae) -> Callable[[list[Image.Image]], list[Image.Image]]:
    """Pictures -> the VAE's reconstructions of them (encode to the latent mean, decode), as pictures."""
    from diffusers.image_processor import VaeImageProcessor

    def run(pictures):
        x = to_tensor([p.convert("RGB") for p in pictures])
        with torch.no_grad():
            y = torch.cat([vae.decode(vae.encode(x[i:i + 128]).latent_dist.mean).sample
                           for i in range(0, len(x), 128)])
        return VaeImageProcessor().postprocess(y, output_type="pil")
    return run
