"""Helpers shared by the export tests."""

import numpy as np
import torch


def train_briefly(model, ids: np.ndarray, steps: int, lr: float, seed: int):
    """`steps` AdamW steps on random 8 x 64 windows of the token array `ids`; the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - 65, size=8)
        x = torch.from_numpy(ids[starts[:, None] + np.arange(64)])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
