"""A small digit classifier trained by the project on the real digits: the quality meter of digits-dit.

It scores generated samples (accuracy on the intended class) and supplies the features of the
Frechet distance between generated and real digits (an FID on our own feature extractor).
Images go in as ``[B, 1, 8, 8]`` in [0, 1], the same as digits-dit's ``output_type="pt"``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PATH = Path(__file__).parent / "weights" / "digits-classifier.safetensors"
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """Two conv layers and a 64-d feature layer; ``features`` feeds the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 64]`` features of ``[B, 1, 8, 8]`` images in [0, 1]."""
        return self.embed(self.conv(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The predicted class of each image."""
        return self(images.float()).argmax(dim=1)


def split_digits(seed: int = 0, held_out: float = 0.2):
    """A fixed, stratified train / held-out split of the real digits, images in [0, 1]."""
    from sklearn.model_selection import train_test_split

    from planner.zoo.digits import load_digits_data

    images, labels = load_digits_data()
    images = (images + 1) / 2
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=held_out, random_state=seed, stratify=labels.numpy()
    )
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def train_classifier(epochs: int = 30, seed: int = 0, out_path: str | Path | None = None) -> tuple[DigitClassifier, dict]:
    """Train the classifier on 80% of the digits (with 1-pixel shift augmentation); report held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = split_digits(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_train), generator=gen).split(64):
            x = x_train[batch]
            # Generated digits are not perfectly centred: shifts make the meter robust to that.
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    accuracy = (model.predict(x_test) == y_test).float().mean().item()
    record = {
        "held_out_accuracy": accuracy,
        "held_out_images": len(y_test),
        "epochs": epochs,
        "seed": seed,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if out_path is not None:
        save_classifier(model, record, out_path)
    return model, record


def save_classifier(model: DigitClassifier, record: dict, path: str | Path) -> None:
    """Write the weights (safetensors, with the training record as metadata) atomically."""
    from safetensors.torch import save_file

    from planner.io import write_atomic

    metadata = {"record": json.dumps(record)}
    write_atomic(path, lambda tmp: save_file(model.state_dict(), str(tmp), metadata=metadata))


_CACHED: DigitClassifier | None = None


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (loaded once per process), or one from ``path``, in eval mode."""
    global _CACHED
    from safetensors.torch import load_file

    if path is None and _CACHED is not None:
        return _CACHED
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path or WEIGHTS_PATH)))
    model.eval().requires_grad_(False)
    if path is None:
        _CACHED = model
    return model


def classifier_record(path: str | Path | None = None) -> dict:
    """The training record stored in the weights file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path or WEIGHTS_PATH), "pt") as f:
        return json.loads(f.metadata()["record"])
