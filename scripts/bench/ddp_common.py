"""What both DDP baselines share (scripts/bench/train_ddp.py and
scripts/gpu_check_ddp.py): the models, built as Ringleader's worker builds
them, and a free port. torch only (no numpy), for machines that have
nothing else."""
import socket

import torch.nn as nn
import torch.nn.functional as F


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class ReferenceCnn(nn.Module):
    """Ringleader's `cnn` model with its defaults (32, 64 channels, 128 hidden, k 3)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * 5 * 5, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def wide_mlp():
    """Ringleader's `mlp` with hidden = [4096, 4096]."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 10),
    )


MODELS = {"cnn": ReferenceCnn, "mlp-wide": wide_mlp}
