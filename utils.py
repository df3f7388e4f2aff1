"""
Pieces shared by train.py and sample.py: the loss and its KL annealing, MNIST and the pixel-500
split, device and seed, checkpoints, figures, and the evaluation metrics of sample.py --metrics.
"""
import argparse
import glob
import math
import os
import random
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
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
    """Per image (B,): KL(q(z|x,c) || N(0, I)) = -0.5 * sum(1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


class BinaryCrossEntropySum(torch.autograd.Function):
    """F.binary_cross_entropy(probabilities, target, reduction="sum"), the tutorial's BCE, with the
    forward written as whole-tensor operations: on a CPU torch's own forward calls log1p one
    element at a time, 3 to 4 times slower (README, Speed). The backward is torch's own, so the
    gradients, and with them training, are bit-identical; the loss value agrees to float
    rounding (log(1 - p) here, log1p(-p) there)."""

    @staticmethod
    def forward(ctx, probabilities, target):
        ctx.save_for_backward(probabilities, target)
        # like torch, each log is clamped at -100, so a saturated pixel costs 100 nats, not inf
        log_p = probabilities.log().clamp_min_(-100)
        log_1mp = (1 - probabilities).log_().clamp_min_(-100)
        return -torch.lerp(log_1mp, log_p, target).sum()  # lerp: t log p + (1 - t) log(1 - p)

    @staticmethod
    def backward(ctx, grad):
        probabilities, target = ctx.saved_tensors
        reduction_sum = 2  # torch's enum for reduction="sum"
        return torch.ops.aten.binary_cross_entropy_backward(grad, probabilities, target, None, reduction_sum), None


def loss_terms(reconstruction, data, mu, logvar):
    """The two ELBO terms, summed over the batch: BCE of the completed pixels, and KL."""
    return BinaryCrossEntropySum.apply(reconstruction, data), kl_divergence(mu, logvar).sum()


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
    """(..., 784) images -> data (..., 500): the top to complete, condition (..., 284): the bottom."""
    return images[..., :SPLIT], images[..., SPLIT:]


def join_image(top, bottom):
    """Put a completed top (..., 500) back on its bottom (..., 284): (..., 784) images."""
    return torch.cat([top, bottom], dim=-1)


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

def save_checkpoint(path, model, optimizer, alpha, epoch, step, args, curriculum_step=0, history=()):
    """Everything --resume needs, as plain dicts, tensors and numbers (so weights_only=True loads
    it), written atomically."""
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(model.config),
        "alpha": alpha,
        "epoch": epoch,
        "step": step,
        "curriculum_step": curriculum_step,
        "history": list(history),  # one dict of numbers per epoch, for --resume and the curves
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "args": vars(args),
    }
    atomic_save(checkpoint, path)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


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
    bare = "model" not in checkpoint  # the tutorial's published file: a bare state_dict
    if bare:
        checkpoint = {"model": checkpoint, "config": asdict(ModelConfig()), "alpha": TUTORIAL_ALPHA}
    try:
        model = MixAndMatchCVAE(ModelConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"], strict=True)
    except (TypeError, RuntimeError, KeyError) as e:
        # load_state_dict's first line is a header; the next names the first mismatch
        lines = [line.strip() for line in str(e).strip().splitlines()]
        sizes = "a bare state_dict, read with the tutorial's sizes" if bare else f"sizes {checkpoint.get('config')}"
        raise SystemExit(f"error: checkpoint {path!r} does not match MixAndMatchCVAE ({sizes}): "
                         f"{lines[1] if len(lines) > 1 else lines[0]}")
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

    fig, ax = plt.subplots(figsize=(13, 3.0))
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
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_history(histories, path):
    """Training curves, one line per run ({name: history} with history as train.py keeps it):
    losses per image on the left, KL per image and its annealing weight on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, kl_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    weight_ax = kl_ax.twinx()
    for (name, history), color in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        epochs = [h["epoch"] for h in history]
        dots = dict(color=color, marker="o", markersize=2.5)  # visible from the first epoch on
        loss_ax.plot(epochs, [h["train_rec"] for h in history], label=f"{name}: train BCE", **dots)
        loss_ax.plot(epochs, [h["test_loss"] for h in history], linestyle="--", label=f"{name}: test BCE + KL", **dots)
        kl_ax.plot(epochs, [h["train_kl"] for h in history], label=f"{name}: train KL", **dots)
    # every run shares the annealing schedule: its weight is drawn once, from the longest run
    longest = max(histories.values(), key=len)
    weight_ax.plot([h["epoch"] for h in longest], [h["kl_weight"] for h in longest], color="grey", linestyle=":",
                   marker="o", markersize=2.5, label="KL weight")
    loss_ax.set(xlabel="epoch", ylabel="nats per image", title="Reconstruction and test loss")
    kl_ax.set(xlabel="epoch", ylabel="KL, nats per image", title="KL term (latent use)")
    weight_ax.set(ylabel="KL weight (logistic annealing)", ylim=(0, 1.05))
    loss_ax.legend(fontsize=8)
    kl_ax.legend(handles=kl_ax.get_legend_handles_labels()[0] + weight_ax.get_legend_handles_labels()[0],
                 fontsize=8, loc="center right")
    for ax in (loss_ax, kl_ax):
        ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)


def save_figure(fig, path, **savefig_kwargs):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, **savefig_kwargs)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation (sample.py --metrics)

@torch.no_grad()
def posterior_draws(model, data, condition, alpha, n_importance):
    """S = n_importance draws per image, each with its own Sampling of I and its own
    z ~ q(z | data, condition, I). Returns per draw and image (S, N): the log importance weight
    log p(data | z, condition, I) + log p(z) - log q(z | data, condition, I), the BCE and the
    analytic KL; and the posterior means (S, N, latent_dim).

    I is drawn from its prior in both the proposal and the model, so p(I) cancels from the
    weights and they estimate p(top | bottom) with the Sampling marginalised out."""
    condition_h = model.condition_encoder(condition)
    log_w, bce, kl, means = [], [], [], []
    for _ in range(n_importance):
        sampled_indices, _ = model.sampling(alpha)
        mu, logvar = model.encode(data, condition_h, sampled_indices)
        z = model.reparameterize(mu, logvar)
        reconstruction = model.decode(z, condition_h, sampled_indices)
        bce.append(F.binary_cross_entropy(reconstruction, data, reduction="none").sum(1))
        kl.append(kl_divergence(mu, logvar))
        log_p, log_q = log_normal(z, torch.zeros_like(mu), torch.zeros_like(logvar)), log_normal(z, mu, logvar)
        log_w.append(-bce[-1] + log_p - log_q)
        means.append(mu)
    return torch.stack(log_w), torch.stack(bce), torch.stack(kl), torch.stack(means)


def log_normal(z, mu, logvar):
    # log N(z; mu, exp(logvar)) summed over the latent units: -0.5 * (log 2 pi + logvar + (z - mu)^2 / var)
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(1)


def importance_weighted_nll(log_w):
    """-log p(top | bottom) per image, -log (1/S) sum_s w_s (Burda et al. 2015): never below the
    ELBO's bound on average, and equal to it in expectation with S = 1."""
    return -(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))


def active_units(means, threshold=0.01):
    """Latent units whose posterior mean varies over the data: Cov_x(E_q[z_u]) > 0.01
    (Burda et al. 2015), the mean taken over the Samplings too. means: (S, N, latent_dim)."""
    return int((means.mean(0).var(0) > threshold).sum())


def completion_distances(completions, truth):
    """completions (N, K, D), truth (N, D). Returns per condition (N,): diversity, the mean
    Euclidean distance from each completion to the K - 1 others; best-of-K error, the smallest
    distance to the truth; and the mean distance to the truth."""
    k = completions.shape[1]
    pairwise = torch.cdist(completions, completions)  # (N, K, K), zero diagonal
    to_truth = (completions - truth[:, None]).norm(dim=2)  # (N, K)
    return pairwise.sum((1, 2)) / (k * (k - 1)), to_truth.min(1).values, to_truth.mean(1)


def classifier_scores(log_probs):
    """log_probs (N, K, 10): the classifier's log p(y | image) for K images of each of N
    conditions. Returns per condition: mean confidence, share of images with confidence >= 0.9,
    number of distinct predicted digits, and the conditional Inception Score
    exp(mean_k KL(p(y | x_k) || mean_k p(y | x_k)))."""
    probs = log_probs.exp()
    confidence = probs.max(dim=2).values  # (N, K)
    distinct = F.one_hot(probs.argmax(dim=2), 10).amax(dim=1).sum(1)
    # log of the mean over the K in log space: finite even where a probability underflows to 0
    log_mean = torch.logsumexp(log_probs, dim=1, keepdim=True) - math.log(log_probs.shape[1])
    inception = ((probs * (log_probs - log_mean)).sum(2).mean(1)).exp()
    return confidence.mean(1), (confidence >= 0.9).float().mean(1), distinct.float(), inception


def digit_classifier():
    """A small CNN for the quality metrics, on flattened (B, 784) images; 99.22% on MNIST's test
    set with the training below (README, Results)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 13, 13)
        nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 5, 5)
        nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10),
    )


def random_shift(images, pixels=2):
    """Each (784,) image moved by a random whole number of pixels, up to `pixels` each way. With
    dropout and a decaying learning rate it took the classifier from 98.6% to 99.2% test accuracy."""
    n = images.shape[0]
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = torch.randint(-pixels, pixels + 1, (n, 2), device=images.device) * 2 / 28  # 2/28 = 1 pixel
    grid = F.affine_grid(theta, (n, 1, 28, 28), align_corners=False)
    return F.grid_sample(images.view(n, 1, 28, 28), grid, align_corners=False).view(n, -1)


def load_or_train_classifier(path, data_root, device, epochs=4, batch_size=128):
    """The digit classifier cached at `path`, trained there on MNIST's training set on first use
    (about a minute on 2 CPU cores). It trains under its own seed, so whether it was cached does
    not change the random draws of the metrics that follow."""
    classifier = digit_classifier().to(device)
    if os.path.isfile(path):
        try:
            classifier.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            return classifier.eval()
        except Exception as e:  # a broken cache is only a cache: train again
            print(f"retraining the digit classifier: cannot read {path} ({type(e).__name__})")
    print(f"training the digit classifier once ({epochs} epochs), cached at {path}", flush=True)
    train_images, train_labels = load_mnist(data_root, train=True, device=device)
    with torch.random.fork_rng():  # the CPU's and the CUDA devices' generators
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.6)
        classifier.train()
        for _ in range(epochs):
            for indices in torch.randperm(len(train_images)).split(batch_size):
                loss = F.cross_entropy(classifier(random_shift(train_images[indices])), train_labels[indices])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
    atomic_save(classifier.state_dict(), path)
    return classifier.eval()


@torch.no_grad()
def classifier_log_probs(classifier, images, batch_size=2000):
    return torch.cat([F.log_softmax(classifier(batch), dim=1) for batch in images.split(batch_size)])
