"""The standard PASCAL VOC colour map (torch-free: the data generator CLI imports it)."""

from __future__ import annotations


def voc_palette(n: int = 256) -> list[int]:
    """Flat [r, g, b, ...] list of the VOC bit-interleaved colour map: 0 black, 1 (128, 0, 0), ...,
    255 (224, 224, 192) for void."""
    pal: list[int] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal
