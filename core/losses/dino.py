"""DINO loss (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294), as in the official `main_dino.py`
(https://github.com/facebookresearch/dino):

    q_t   = softmax((t - center) / tau_t(epoch))      over the 2 global crops (teacher, detached)
    log p = log_softmax(s / tau_s)                     over all crops (student)
    L     = mean over pairs (iq, v), v != iq, of  mean_batch sum_k -q_iq[k] log p_v[k]
    center <- m * center + (1 - m) * mean_global_batch(t)          (all_reduce under DDP)

tau_t warms up linearly from `warmup_teacher_temp` to `teacher_temp` over
`warmup_teacher_temp_epochs` epochs (np.linspace, as official) and stays there.

Collapse monitors (the DINO paper's section 5.3 / Fig. 7 analysis): each call leaves in `last_stats`
(detached tensors, no host sync) the decomposition of its cross-entropy, H(q, p) = h(q) + KL(q || p):
`teacher_entropy` = mean over the global crops and the batch of h(q) (ln K for a uniform collapse, 0 for a
one-hot collapse) and `teacher_student_kl` = the mean over the same crop pairs as the loss of KL(q || p)
(0 in both collapses). `teacher_entropy + teacher_student_kl == loss`. `teacher_batch_entropy` = the
entropy of the teacher's distribution averaged over the batch (both global crops), h(mean_b q): ln of the
effective number of output dimensions the batch uses; it tells a healthy sharp teacher (each image its own
dimensions: high) from a one-hot collapse (every image the same dimension: 0), which both have a low h(q).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class DINOLoss(nn.Module):
    """`DINOLoss(out_dim, ...)(student_out, teacher_out, epoch) -> scalar`.

    `student_out`: (n_crops * B, out_dim) tensor (crops concatenated in the order global 1,
    global 2, local 1, ...) or a list of per-crop (B, out_dim) tensors. `teacher_out`: (2 * B,
    out_dim) (the 2 global crops) or a list of 2 tensors. The center is a buffer (saved in
    checkpoints) updated after every call in training mode.
    """

    def __init__(
        self,
        out_dim: int,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        n_epochs: int = 1,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.out_dim = int(out_dim)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.teacher_temp = float(teacher_temp)
        warm = int(max(0, warmup_teacher_temp_epochs))
        n_epochs = int(max(n_epochs, warm, 1))
        self.teacher_temp_schedule = np.concatenate(
            (np.linspace(warmup_teacher_temp, teacher_temp, warm), np.ones(n_epochs - warm) * teacher_temp)
        )
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict[str, Tensor] = {}

    def teacher_temp_at(self, epoch: int) -> float:
        e = int(min(max(epoch, 0), len(self.teacher_temp_schedule) - 1))
        return float(self.teacher_temp_schedule[e])

    def forward(self, student_out: Union[Tensor, Sequence[Tensor]], teacher_out: Union[Tensor, Sequence[Tensor]],
                epoch: int = 0) -> Tensor:
        teacher = torch.cat(list(teacher_out)) if isinstance(teacher_out, (list, tuple)) else teacher_out
        if isinstance(student_out, (list, tuple)):
            student_chunks = list(student_out)
        else:
            b = teacher.shape[0] // 2
            if b == 0 or student_out.shape[0] % b:
                raise ValueError(
                    f"student output ({student_out.shape[0]} rows) is not a whole number of crops of the "
                    f"teacher's batch ({b})"
                )
            student_chunks = list(student_out.chunk(student_out.shape[0] // b))
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            teacher_f = teacher.float()
            temp = self.teacher_temp_at(epoch)
            q_all = F.softmax((teacher_f - self.center) / temp, dim=-1).detach().chunk(2)
            logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_chunks]
            total = teacher_f.new_zeros(())
            n_terms = 0
            entropy = teacher_f.new_zeros(())
            for iq, q in enumerate(q_all):
                h = torch.sum(-q * torch.log(q.clamp_min(1e-30)), dim=-1).mean()  # h(q), 0 log 0 = 0
                for v, lp in enumerate(logp):
                    if v == iq:
                        continue
                    total = total + torch.sum(-q * lp, dim=-1).mean()
                    entropy = entropy + h
                    n_terms += 1
            loss = total / max(n_terms, 1)
            h_mean = entropy.detach() / max(n_terms, 1)
            q_bar = torch.cat(q_all).mean(dim=0)
            h_batch = torch.sum(-q_bar * torch.log(q_bar.clamp_min(1e-30)))
            self.last_stats = {"teacher_entropy": h_mean, "teacher_student_kl": loss.detach() - h_mean,
                               "teacher_batch_entropy": h_batch.detach()}
        if self.training:
            self.update_center(teacher_f)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        batch_center = torch.sum(teacher_out.detach().float(), dim=0, keepdim=True)
        world = _world_size()
        if world > 1:
            torch.distributed.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_out) * world)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, student_temp={self.student_temp}, teacher_temp={self.teacher_temp}, "
                f"center_momentum={self.center_momentum}")
