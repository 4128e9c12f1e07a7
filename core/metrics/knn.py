"""SSL quality monitors on frozen features: weighted k-NN (DINO's `eval_knn.py`) and a linear probe.

Both return top-1 accuracy in percent (0-100). `METRICS` declares what a pretraining run writes from them
(core/metrics/registry.py): `knn_acc` before and after pretraining, `linear_probe_acc` after, both on the
pooled features of the exported backbone on the k-NN images (`core.methods.knn_monitor.knn_eval`: one
feature pass gives both).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from core.metrics.registry import AFTER, BEFORE, Column, EvalContext, MetricSpec
from core.stages import PRETRAIN


def _as_labels(y) -> Tensor:
    return torch.as_tensor(y).long().flatten().cpu()


@torch.no_grad()
def knn_accuracy(train_feats: Tensor, train_labels, test_feats: Tensor, test_labels, k: int = 20,
                 T: float = 0.07, num_classes: Optional[int] = None, chunk: int = 256) -> float:
    """Weighted cosine k-NN (Wu et al. 2018, as DINO): the k nearest train features (cosine
    similarity s) vote for their label with weight exp(s / T); accuracy of the top vote, in percent."""
    xtr = F.normalize(torch.as_tensor(train_feats).float().cpu(), dim=1)
    xte = F.normalize(torch.as_tensor(test_feats).float().cpu(), dim=1)
    ytr, yte = _as_labels(train_labels), _as_labels(test_labels)
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise ValueError("knn_accuracy: features and labels disagree on the number of samples")
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        return float("nan")
    if num_classes is None:
        num_classes = int(max(ytr.max().item(), yte.max().item())) + 1
    k = max(1, min(int(k), xtr.shape[0]))
    correct = 0
    for i in range(0, xte.shape[0], chunk):
        f, t = xte[i:i + chunk], yte[i:i + chunk]
        sim = f @ xtr.T
        dist, idx = sim.topk(k, dim=1, largest=True, sorted=True)
        neigh = ytr[idx]  # (b, k)
        one_hot = torch.zeros(f.shape[0], k, num_classes).scatter_(2, neigh.unsqueeze(-1), 1.0)
        probs = (one_hot * (dist / T).exp().unsqueeze(-1)).sum(1)
        correct += (probs.argmax(1) == t).sum().item()
    return 100.0 * correct / xte.shape[0]


def linear_probe_accuracy(train_feats: Tensor, train_labels, test_feats: Tensor, test_labels,
                          epochs: int = 100, weight_decay: float = 1e-4, num_classes: Optional[int] = None,
                          seed: int = 0) -> float:
    """Multinomial logistic regression on frozen, standardised features (train statistics), trained
    full-batch with L-BFGS for `epochs` iterations (CPU seconds); test accuracy in percent."""
    xtr = torch.as_tensor(train_feats).float().cpu()
    xte = torch.as_tensor(test_feats).float().cpu()
    ytr, yte = _as_labels(train_labels), _as_labels(test_labels)
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        return float("nan")
    if num_classes is None:
        num_classes = int(max(ytr.max().item(), yte.max().item())) + 1
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=int(epochs), history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = lin(xte).argmax(1)
    return 100.0 * (pred == yte).float().mean().item()


def _knn_eval(ctx: EvalContext) -> dict:
    """One k-NN pass of an evaluation (with the linear probe when `linear_probe_acc` is evaluated too)."""
    from core.methods.knn_monitor import knn_eval

    return ctx.once("knn", lambda: knn_eval(ctx.backbone, ctx.loaders.knn_train, ctx.loaders.knn_val, ctx.device,
                                            k=ctx.cfg.knn_k, T=0.07, linear_probe=ctx.wants("linear_probe_acc")))


METRICS = (
    MetricSpec("knn_acc", PRETRAIN.name, "k-NN accuracy (%) of the frozen pooled features after pretraining", AFTER,
               compute=lambda ctx: _knn_eval(ctx)["knn_acc"], order=10, headline=True,
               columns=(Column("pretraining", "k-NN acc", 2, best=+1, position=10),
                        Column("emerging", "k-NN acc", 2, best=+1, position=10))),
    MetricSpec("knn_acc_init", PRETRAIN.name, "the same before pretraining", BEFORE,
               compute=lambda ctx: _knn_eval(ctx)["knn_acc"], order=11,
               columns=(Column("pretraining", "k-NN at init", 2, position=11),)),
    MetricSpec("linear_probe_acc", PRETRAIN.name,
               "linear-probe accuracy (%) on the frozen pooled features after pretraining", AFTER,
               compute=lambda ctx: _knn_eval(ctx).get("linear_probe_acc"), order=12,
               columns=(Column("pretraining", "Linear probe", 2, best=+1, position=20),
                        Column("emerging", "Linear probe", 2, best=+1, position=20))),
)
