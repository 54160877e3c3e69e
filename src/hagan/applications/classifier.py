"""The 3D CNN of HA-GAN's supplementary Table VIII and the loop that trains it for a fixed number of epochs.

Table VIII (input 1 x 128^3): stages of 3x3x3 convolutions, each followed by BatchNorm and ELU, with
channels 8 -> 16 -> 32 -> 64 -> 128; every stage but the first repeats a stride-1 convolution and ends
with a stride-2 one, then global average pooling and one dense layer. The same layout serves any
cube edge that is a multiple of 32 (it halves five times); ``width`` scales the channels for CPU runs.
The paper gives no optimiser: Adam at 1e-3 with batch 8 is used here, stated in every results file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor, nn
from tqdm import tqdm

from hagan.errors import HaganError

# (output channels, stride) of each convolution in Table VIII, in order
TABLE_VIII = ((8, 1), (8, 2), (16, 1), (16, 1), (16, 2), (32, 1), (32, 1), (32, 2),
              (64, 1), (64, 1), (64, 2), (128, 1), (128, 2))


class Table8CNN(nn.Module):
    def __init__(self, num_classes: int, width: float = 1.0):
        super().__init__()
        if num_classes < 2:
            raise HaganError(f"a classifier needs at least 2 classes, got {num_classes}")
        layers: list[nn.Module] = []
        channels = 1
        for out, stride in TABLE_VIII:
            out = max(1, round(out * width))
            layers += [nn.Conv3d(channels, out, 3, stride, padding=1, bias=False), nn.BatchNorm3d(out), nn.ELU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool3d(self.features(x), 1).flatten(1))


@dataclass
class TrainingRecipe:
    """What the paper fixes (20 epochs) and what it leaves open (optimiser, batch, learning rate)."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    width: float = 1.0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.width <= 0:
            raise HaganError(f"classifier epochs, batch size, learning rate and width must be positive, got {self}")


def _device_tensor(volumes: np.ndarray, device: torch.device) -> Tensor:
    """(n, 1, S, S, S) in half precision on ``device``: a whole training set fits, and BatchNorm sees
    the same values float32 would to 3 significant digits."""
    return torch.as_tensor(np.asarray(volumes, np.float16))[:, None].to(device)


def train_classifier(
    volumes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe: TrainingRecipe,
    seed: int,
    device: torch.device,
    progress: bool = False,
    description: str = "classifier",
) -> Table8CNN:
    """Train from a seeded initialisation and a seeded order for ``recipe.epochs`` epochs; no model selection."""
    recipe.check()
    labels = np.asarray(labels, np.int64)
    if len(volumes) != len(labels) or len(labels) == 0:
        raise HaganError(f"classifier training needs as many labels as volumes, got {len(volumes)} and {len(labels)}")
    torch.manual_seed(seed)
    model = Table8CNN(num_classes, recipe.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    x, y = _device_tensor(volumes, device), torch.as_tensor(labels, device=device)
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    steps = recipe.epochs * -(-len(y) // recipe.batch_size)
    with tqdm(total=steps, desc=description, unit="batch", disable=not progress, leave=False) as bar:
        for _ in range(recipe.epochs):
            order = torch.randperm(len(y), generator=order_rng).to(device)
            for begin in range(0, len(y), recipe.batch_size):
                batch = order[begin : begin + recipe.batch_size]
                if len(batch) < 2:  # BatchNorm needs two samples
                    continue
                with _autocast(device):
                    loss = F.cross_entropy(model(x[batch].float()), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
    return model.eval()


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_proba(model: Table8CNN, volumes: np.ndarray, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """Class probabilities (n, classes) in evaluation mode (BatchNorm's running statistics)."""
    model.eval()
    out = []
    for begin in range(0, len(volumes), batch_size):
        x = _device_tensor(volumes[begin : begin + batch_size], device).float()
        with _autocast(device):
            out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out).numpy()


def classification_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy (the paper's Table V), balanced accuracy and macro one-vs-rest AUC (MedMNIST's metric)."""
    labels = np.asarray(labels, np.int64)
    predicted = probabilities.argmax(axis=1)
    present = np.unique(labels)
    recalls = [float((predicted[labels == c] == c).mean()) for c in present]
    aucs = [_auc(probabilities[:, c], labels == c) for c in present if 0 < (labels == c).sum() < len(labels)]
    return {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
    }


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve from ranks (the Mann-Whitney U statistic), ties counted half."""
    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
