"""Barlow Twins loss: formula, lightly equivalence, BatchNorm normalisation, DDP (gloo, 2 processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from core.losses import BarlowTwinsLoss, cc_statistics, cross_correlation


def _direct_loss(z1, z2, lambd, scale, eps=1e-5):
    """Per-element loops over a small D: the formula of the paper, nothing vectorised."""
    n, d = z1.shape
    z1 = z1.double()
    z2 = z2.double()

    def norm(z):
        out = torch.empty_like(z)
        for j in range(d):
            col = z[:, j]
            mu = sum(col[i] for i in range(n)) / n
            var = sum((col[i] - mu) ** 2 for i in range(n)) / n  # biased, as BatchNorm
            for i in range(n):
                out[i, j] = (col[i] - mu) / torch.sqrt(var + eps)
        return out

    a, b = norm(z1), norm(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss = loss + ((1 - c_ij) ** 2 if i == j else lambd * c_ij ** 2)
    return scale * loss


@pytest.mark.parametrize("lambd,scale", [(0.0051, 1.0), (0.3, 2.5), (0.0, 0.5)])
def test_barlow_twins_matches_direct_formula(lambd, scale):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 4, generator=g)
    z2 = z1 + 0.5 * torch.randn(6, 4, generator=g)
    got = BarlowTwinsLoss(lambd=lambd, scale=scale)(z1, z2)
    want = _direct_loss(z1, z2, lambd, scale)
    assert torch.allclose(got.double(), torch.as_tensor(want), rtol=1e-5, atol=1e-6)


def test_barlow_twins_matches_lightly():
    from lightly.loss import BarlowTwinsLoss as LightlyBT

    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(32, 16, generator=g)
    z2 = torch.randn(32, 16, generator=g)
    for lambd in (0.0051, 0.1):
        ours = BarlowTwinsLoss(lambd=lambd)(z1, z2)
        theirs = LightlyBT(lambda_param=lambd)(z1, z2)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_cross_correlation_is_batchnorm_product():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(10, 5, generator=g) * 3 + 1
    z2 = torch.randn(10, 5, generator=g) - 2
    bn = torch.nn.BatchNorm1d(5, affine=False)
    bn.train()
    want = bn(z1).T @ bn(z2) / 10
    assert torch.allclose(cross_correlation(z1, z2), want, atol=1e-6)
    # identical views: diagonal ~ 1
    c = cross_correlation(z1, z1)
    stats = cc_statistics(c)
    assert abs(stats["cc_diag_mean"] - 1) < 1e-4
    loss = BarlowTwinsLoss()
    loss(z1, z2)
    assert loss.last_cc is not None and not loss.last_cc.requires_grad


def test_barlow_twins_loss_rejects_negative_lambda():
    with pytest.raises(ValueError):
        BarlowTwinsLoss(lambd=-1.0)


# --------------------------------------------------------------------------- DDP (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, x1, x2, w0, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lin = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w0)
        model = torch.nn.parallel.DistributedDataParallel(lin)
        n = x1.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        loss = BarlowTwinsLoss(lambd=0.02)(model(x1[sl]), model(x2[sl]))
        loss.backward()  # DDP averages parameter gradients over ranks

        from core.losses.dino import DINOLoss

        dl = DINOLoss(out_dim=x1.shape[1], warmup_teacher_temp_epochs=0, n_epochs=1)
        dl(torch.cat([x1[sl], x2[sl]]), torch.cat([x1[sl], x2[sl]]), 0)
        # gather=False: this rank's batch alone (called on every rank, so that a wrong gather shows as
        # the global matrix below instead of a hang)
        local_cc = cross_correlation(x1[sl], x2[sl], gather=False)
        torch.save({"loss": loss.detach(), "grad": lin.weight.grad.clone(), "center": dl.center.clone(),
                    "local_cc": local_cc}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gathered_loss_and_gradients_equal_full_batch(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(8, 6, generator=g)
    x2 = x1 + 0.3 * torch.randn(8, 6, generator=g)
    w0 = torch.randn(5, 6, generator=g)
    mp.spawn(_ddp_worker, args=(2, _free_port(), x1, x2, w0, str(tmp_path)), nprocs=2, join=True)

    lin = torch.nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w0)
    full = BarlowTwinsLoss(lambd=0.02)(lin(x1), lin(x2))
    full.backward()
    from core.losses.dino import DINOLoss

    dl = DINOLoss(out_dim=6, warmup_teacher_temp_epochs=0, n_epochs=1)
    # the center of a per-rank [x1_r; x2_r] teacher output over both ranks = mean of all rows
    dl.update_center(torch.cat([x1, x2]))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.allclose(res["loss"], full.detach(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(res["grad"], lin.weight.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(res["center"], dl.center, atol=1e-6)
    local = torch.load(tmp_path / "rank0.pt", weights_only=True)["local_cc"]
    bn = torch.nn.BatchNorm1d(6, affine=False)  # the formula on rank 0's half only
    assert torch.allclose(local, bn(x1[:4]).T @ bn(x2[:4]) / 4, atol=1e-5)
    assert not torch.allclose(local, cross_correlation(x1, x2), atol=1e-3)  # not the global batch
