"""blip3o-mini: an educational reproduction of BLIP3-o (arXiv 2505.09568).

Understanding with a frozen vision-language backbone; generation with a diffusion transformer
trained by flow matching to produce CLIP image features, decoded to pixels by a diffusion decoder.
"""

__version__ = "0.1.0"
