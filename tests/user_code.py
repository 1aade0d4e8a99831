"""Code shaped like our users' code, named in test configs as `user_code:...` (tests/ is on
the path of every test process): an nn.Module loss with buffers, a data set without a
`targets` attribute and with dict batches, a model that takes keyword inputs and returns a
dict, and a step function."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class LDAMLoss(nn.Module):
    """LDAM as our users' scripts write it: an nn.Module, forward(x, target), a buffer."""

    def __init__(self, cls_num_list, max_m=0.5, s=30.0):
        super().__init__()
        m_list = 1.0 / np.sqrt(np.sqrt(np.asarray(cls_num_list, dtype=np.float64)))
        self.register_buffer("m_list", torch.tensor(m_list * (max_m / m_list.max()),
                                                    dtype=torch.float32))
        self.s = s

    def forward(self, x, target):
        x = x.float()
        x_m = x.scatter_add(1, target.unsqueeze(1), -self.m_list[target].unsqueeze(1))
        return F.cross_entropy(self.s * x_m, target)


def ldam_module(class_counts, max_m=0.5, s=30.0):
    return LDAMLoss(class_counts, max_m, s)


def cross_entropy_module():
    return nn.CrossEntropyLoss()
