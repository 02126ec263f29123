"""Draw digit images the way a user would photograph them: dark ink on light, slightly uneven
paper, off-centre, in an image far from 28x28. Writes examples/three.png and examples/seven.jpg.

    .venv/bin/python examples/make_digits.py
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont


def draw_digit(digit: str, size: tuple[int, int], at: tuple[int, int], height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    paper = Image.new("L", size, 228)
    noise = Image.effect_noise(size, 12).point(lambda v: 228 + (v - 128) // 10)  # paper texture
    paper = Image.blend(paper, noise, 0.5)
    ink = Image.new("L", size, 0)
    font = ImageFont.load_default(size=height)
    ImageDraw.Draw(ink).text(at, digit, fill=255, font=font, anchor="mm", stroke_width=max(2, height // 14),
                             stroke_fill=255)
    ink = ink.rotate(rng.uniform(-8, 8), center=at, resample=Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1.2))
    dark = Image.new("L", size, 35)
    return Image.composite(dark, paper, ink)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    draw_digit("3", (240, 180), (90, 100), 120, seed=3).save(here / "three.png")
    draw_digit("7", (200, 260), (120, 120), 150, seed=7).convert("RGB").save(here / "seven.jpg", quality=90)
    print("wrote", here / "three.png", here / "seven.jpg")
