"""
Pieces shared by train.py and sample.py: the loss and its KL annealing, MNIST and the pixel-500
split, device and seed, and checkpoints.
"""
import argparse
import glob
import os
import random
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from model import MixAndMatchCVAE, ModelConfig

SPLIT = 500  # pixels 0..499 are the data to complete, 500..783 the condition (the digit's bottom)
TUTORIAL_ALPHA = 64  # alpha used with the tutorial's plain state_dict, which does not store one
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# ----------------------------------------------------------------------------- loss

def kl_anneal_function(anneal_function, step, k, x0):
    """Weight of the KL term at a training step (tutorial; Bowman et al. 2016): a logistic ramp
    centred on step x0 with slope k, or a linear ramp reaching 1 at step x0."""
    if anneal_function == "logistic":
        return float(1 / (1 + np.exp(-k * (step - x0))))
    if anneal_function == "linear":
        return min(1.0, step / x0)
    raise ValueError(f"anneal_function must be 'logistic' or 'linear', got {anneal_function!r}")


def kl_divergence(mu, logvar):
    # KL(q(z|x,c) || N(0, I)) = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)), summed over the batch
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def loss_terms(reconstruction, data, mu, logvar):
    """The two ELBO terms, summed over the batch: BCE of the completed pixels, and KL."""
    bce = F.binary_cross_entropy(reconstruction, data, reduction="sum")
    return bce, kl_divergence(mu, logvar)


# ----------------------------------------------------------------------------- data

def mnist_dataset(root, train):
    """torchvision's MNIST, downloaded when missing and online; offline, a message that says
    where the four raw files go."""
    from torchvision import datasets  # imported here so that model.py users need no torchvision

    try:
        return datasets.MNIST(root, train=train, download=False)
    except RuntimeError:
        pass
    try:
        return datasets.MNIST(root, train=train, download=True)
    except Exception as e:  # any network failure: we only need to tell the user what to do
        raw = os.path.join(root, "MNIST", "raw")
        raise SystemExit(
            f"error: MNIST is not under {raw} and could not be downloaded ({type(e).__name__}).\n"
            f"Put the four raw files there ({', '.join(MNIST_FILES)}; .gz also works), "
            f"or pass --data-root to the folder that holds MNIST/raw/.")


def load_mnist(root, train, device):
    """One split as a single tensor on `device`: images (N, 784) in [0, 1] (the values
    transforms.ToTensor gives) and labels (N,). Converting all 60000 images once, instead of
    each image through PIL every epoch as the tutorial's DataLoader does, is most of our speed-up."""
    dataset = mnist_dataset(root, train)
    images = dataset.data.reshape(len(dataset), -1).float().div(255)
    return images.to(device), dataset.targets.to(device)


def split_image(images):
    """(B, 784) images -> data (B, 500): the top to complete, condition (B, 284): the bottom."""
    return images[:, :SPLIT], images[:, SPLIT:]


def join_image(top, bottom):
    """Put a completed top (B, 500) back on its bottom (B, 284): (B, 784) images."""
    return torch.cat([top, bottom], dim=1)


def to_grid_images(flat):
    """(B, 784) -> (B, 1, 28, 28) for torchvision.utils.save_image / make_grid."""
    return flat.reshape(-1, 1, 28, 28)


# ----------------------------------------------------------------------------- run setup

def positive_int(text):
    """argparse type: a whole number >= 1, else argparse's one-line usage error."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def get_device(name):
    """'auto' picks CUDA when available; otherwise the named device ('cpu', 'cuda', 'cuda:1')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for CUDA, which is not available here; "
                         f"use --device cpu or auto")
    return device


def set_seed(seed):
    # every generator a run could touch; ours draws only from torch's
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, optimizer, alpha, epoch, step, args):
    """Everything --resume needs, as plain dicts, tensors and numbers (so weights_only=True loads
    it). Written to a temporary file and renamed: a crash mid-write never leaves a broken file."""
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(model.config),
        "alpha": alpha,
        "epoch": epoch,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "args": vars(args),
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def newest_checkpoint(checkpoint_dir):
    paths = glob.glob(os.path.join(checkpoint_dir, "mix_match_*.pth"))
    if not paths:
        raise SystemExit(f"error: no checkpoint/mix_match_*.pth under {checkpoint_dir!r}; "
                         f"train one with `python3 train.py` or pass --checkpoint PATH")
    return max(paths, key=os.path.getmtime)


def load_checkpoint(path, device):
    """Our checkpoint, or the tutorial's plain state_dict (default sizes, alpha 64).
    Returns (model on device, checkpoint dict); errors a user can cause end in one message."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise SystemExit(f"error: cannot read checkpoint {path!r}: it is truncated or not a "
                         f"checkpoint of this repository ({type(e).__name__}). "
                         f"Download it again or retrain with `python3 train.py`.")
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"error: {path!r} holds a {type(checkpoint).__name__}, not a checkpoint")
    if "model" not in checkpoint:  # the tutorial's published file: a bare state_dict
        checkpoint = {"model": checkpoint, "config": asdict(ModelConfig()), "alpha": TUTORIAL_ALPHA}
    try:
        model = MixAndMatchCVAE(ModelConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"], strict=True)
    except (TypeError, RuntimeError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise SystemExit(f"error: checkpoint {path!r} does not match MixAndMatchCVAE "
                         f"{checkpoint.get('config')}: {first_line}")
    return model.to(device), checkpoint


# ----------------------------------------------------------------------------- figure

def plot_sampling_resampling(sampled_indices, complementary_indices, hidden_dim, path):
    """Draw one Sampling (I and its complement) and the encoder's and decoder's Resampling it
    gives, cell by cell over the hidden vector."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    sampled, complementary = sampled_indices.cpu(), complementary_indices.cpu()
    names = ["complementary indices Ī", "sampled indices I", "data representation",
             "condition representation", "lifted latent z"]
    colors = ["#d9d9d9", "#252525", "#1f77b4", "#ff7f0e", "#2ca02c"]
    rows = torch.zeros(3, hidden_dim, dtype=torch.long)
    rows[0, sampled] = 1
    rows[1, sampled], rows[1, complementary] = 2, 3  # encoder: data at I, condition at Ī
    rows[2, sampled], rows[2, complementary] = 3, 4  # decoder: condition at I, latent at Ī

    fig, ax = plt.subplots(figsize=(13, 3.4))
    ax.imshow(rows.numpy(), cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1,
              aspect="auto", interpolation="nearest")
    ax.set_yticks([0, 1, 2], ["Sampling", "Resampling\n(encoder)", "Resampling\n(decoder)"])
    ax.set_xticks(range(0, hidden_dim, max(1, hidden_dim // 16)))
    ax.set_xticks([x - 0.5 for x in range(hidden_dim + 1)], minor=True)
    ax.grid(which="minor", axis="x", color="white", linewidth=0.3)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("index of the hidden vector")
    ax.set_title(f"One draw: hidden_dim = {hidden_dim}, alpha = |I| = {len(sampled)}, |Ī| = {len(complementary)}")
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, names)],
              loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=5, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
