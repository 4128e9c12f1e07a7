"""Random-number state that a side computation must not disturb.

`preserved_rng()` restores python's `random`, numpy's and torch's (CPU and the given CUDA device's)
generators when the block ends, so an evaluation before training (k-NN, dense probe, attention Jaccard)
or a FLOP count leaves the training's random stream (augmentations drawn in the main process,
dropout) exactly as `seed_everything` set it: adding or removing such a measurement does not change
the training it measures.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional

import numpy as np
import torch


@contextlib.contextmanager
def preserved_rng(device: Optional[torch.device] = None) -> Iterator[None]:
    """Run the block, then put every generator back as it was before the block."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
