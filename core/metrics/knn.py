"""SSL quality monitors on frozen features: weighted k-NN (DINO's `eval_knn.py`) and a linear probe.

Both return top-1 accuracy in percent (0-100).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
