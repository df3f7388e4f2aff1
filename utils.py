"""
What train.py and sample.py share and no trained number depends on: the seed, MNIST and its checks,
checkpoints; the measures of sample.py --metrics, in a section of their own; figures; then the
safeguards (argument types, devices, file checks, atomic writes, signals).
"""
import argparse
import contextlib
import errno
import glob
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import shlex
import signal
import struct
import subprocess
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import Config, MixAndMatchCVAE, kl_divergence, split_image

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# -----------------------------------------------------------------------------
# the seed, MNIST, checkpoints

def set_seed(seed):
    # every generator a run could touch; ours draws only from torch's
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def load_mnist(root, train, device):
    """One split as a single tensor on `device`: images (N, 784) in [0, 1] (the values
    transforms.ToTensor gives) and labels (N,). Converting all 60000 images once, instead of
    each image through PIL every epoch as the tutorial's DataLoader does, is most of our speed-up."""
    dataset = mnist_dataset(root, train)
    images = dataset.data.reshape(len(dataset), -1).float().div(255)
    return images.to(device), dataset.targets.to(device)


def mnist_dataset(root, train):
    """torchvision's MNIST, downloaded when missing and online. A raw file that is there but
    broken is named as such (torchvision reports it as missing); offline, a message says where
    the four raw files go."""
    from torchvision import datasets  # imported here so that model.py users need no torchvision

    raw = os.path.join(root, "MNIST", "raw")
    if os.path.exists(root) and not os.path.isdir(root):
        raise SystemExit(f"error: --data-root {root!r} is a file; pass the folder that holds MNIST/raw/")
    extract_gz_files(raw)
    check_idx_files(raw)
    with contextlib.suppress(RuntimeError):  # a raw file missing: download it
        return datasets.MNIST(root, train=train, download=False)
    try:
        dataset = datasets.MNIST(root, train=train, download=True)
        check_idx_files(raw)  # the files it extracted or downloaded
        return dataset
    except Exception as e:  # noqa: BLE001 (any network or extraction failure: the user needs to know what to do)
        check_idx_files(raw)  # a .gz extracted just now may be the broken file
        missing = [name for name in MNIST_FILES if not any(os.path.isfile(os.path.join(raw, name + ext))
                                                           for ext in ("", ".gz"))]
        if not missing:
            raise SystemExit(f"error: cannot read MNIST under {raw} ({type(e).__name__}: {e}). "
                             f"Replace the four raw files with intact copies.")
        raise SystemExit(
            f"error: MNIST is not under {raw} and could not be downloaded ({type(e).__name__}); "
            f"missing: {', '.join(missing)}.\n"
            f"Put the four raw files there ({', '.join(MNIST_FILES)}; .gz also works), "
            f"or pass --data-root to the folder that holds MNIST/raw/.")


def extract_gz_files(raw):
    """Decompress the raw files that are there only as .gz, beside them. torchvision extracts a .gz
    only when its MD5 is that of the original download, and otherwise tries to download the file;
    a .gz compressed by anyone else is as good."""
    for name in MNIST_FILES:
        path = os.path.join(raw, name)
        if os.path.isfile(path) or not os.path.isfile(path + ".gz"):
            continue
        try:
            with gzip.open(path + ".gz", "rb") as f:
                data = f.read()
        except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
            raise SystemExit(f"error: the MNIST file {path}.gz is there but cannot be decompressed "
                             f"({type(e).__name__}): replace it with an intact copy, or put the decompressed "
                             f"{name} there instead")
        try:
            atomic_write(path, lambda f, data=data: f.write(data))
        except OSError as e:
            raise SystemExit(f"error: cannot write {path}, decompressed from {path}.gz ({e.strerror}); decompress the "
                             f".gz files there yourself (gunzip), or copy MNIST/raw/ to a writable --data-root")
        print(f"decompressed {path}.gz")


def check_idx_files(raw):
    """The raw MNIST files present in `raw`, before torchvision reads them (yann.lecun.com/exdb/mnist):
    each a whole IDX file of unsigned bytes (a header of magic number and dimensions, then exactly
    their product of bytes), images of 28 x 28 and labels of one dimension; and each split's two
    files a pair: as many labels as images, every label a digit 0 to 9. Whole files that do not
    belong together (the test labels copied over the training labels, say) are named here, not
    met as an IndexError deep in the metrics."""
    shapes = {}
    for name in MNIST_FILES:
        path = os.path.join(raw, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            magic = f.read(4)
            ndim = magic[3] if len(magic) == 4 and magic[:3] == b"\x00\x00\x08" else 0
            dims = f.read(4 * ndim)
        shape = struct.unpack(f">{ndim}I", dims) if len(dims) == 4 * ndim else None
        size = os.path.getsize(path)
        if not ndim or shape is None or size != 4 + 4 * ndim + math.prod(shape):
            found = "no IDX header" if shape is None or not ndim else \
                f"{size} bytes, its header says {4 + 4 * ndim + math.prod(shape)}"
            raise SystemExit(f"error: the MNIST file {path} is there but unreadable ({found}): it is "
                             f"truncated or not an IDX file. Replace it with an intact copy (or delete "
                             f"it, and it is downloaded again when online).")
        expected = "28 x 28 images" if "images" in name else "labels (one dimension)"
        if shape[1:] != ((28, 28) if "images" in name else ()):
            raise SystemExit(f"error: the MNIST file {path} holds an array of shape {shape}, where {expected} "
                             f"belong: it is another file under this name. Replace it with the MNIST file.")
        shapes[name] = shape
    for images, labels in (MNIST_FILES[:2], MNIST_FILES[2:]):
        if images not in shapes or labels not in shapes:
            continue
        images_path, labels_path = os.path.join(raw, images), os.path.join(raw, labels)
        if shapes[images][0] != shapes[labels][0]:
            raise SystemExit(f"error: the MNIST files {images_path} ({shapes[images][0]} images) and {labels_path} "
                             f"({shapes[labels][0]} labels) do not belong together: each split's images and labels "
                             f"come as a pair. Replace them with the pair from one MNIST download.")
        with open(labels_path, "rb") as f:
            values = np.frombuffer(f.read()[8:], dtype=np.uint8)
        if values.size and values.max() > 9:
            index = int(np.argmax(values > 9))
            raise SystemExit(f"error: the MNIST file {labels_path} holds the label {values[index]} (image {index}), "
                             f"where digits 0 to 9 belong. Replace it with the MNIST file.")


def save_checkpoint(path, model, optimizer, config, epoch, step, history):
    """Everything --resume needs, the run's settings whole among it, as plain dicts, tensors and
    numbers (so weights_only=True loads it), written atomically."""
    device = model.mean.weight.device
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(config),  # model.Config: the model's sizes and the recipe
        "epoch": epoch,
        "step": step,
        "history": list(history),  # one dict of numbers per epoch, for --resume and the curves
        "optimizer": optimizer.state_dict(),
        "device": str(device),  # the one the run used; its args.json says what was asked for ("auto")
        # the CPU's generator shuffles the batches; the device's draws the Sampling and z (the CPU's
        # again on a CPU)
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
                else None},
    }
    if device.type == "mps":  # a Mac's GPU has a generator of its own
        checkpoint["rng"]["mps"] = torch.mps.get_rng_state()
    atomic_save(checkpoint, path)


def load_checkpoint(path, device, resume=False):
    """(model on device, checkpoint dict) of our checkpoint, or of the tutorial's plain state_dict
    (the default settings); with `resume`, only a checkpoint train.py can continue. Errors a user
    can cause end in one message."""
    if os.path.isdir(path):
        raise SystemExit(f"error: checkpoint {path!r} is a folder; pass one of its mix_match_*.pth files")
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:  # no permission to read it, say: the file itself may be fine
        raise SystemExit(f"error: cannot read checkpoint {path!r}: {e.strerror}")
    except Exception as e:  # noqa: BLE001 (truncated, not a torch file, or objects weights_only refuses)
        raise SystemExit(f"error: cannot read checkpoint {path!r}: it is truncated or not a "
                         f"checkpoint of this repository ({type(e).__name__}). "
                         f"Download it again or retrain with `python3 train.py`.")
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"error: {path!r} holds a {type(checkpoint).__name__}, not a checkpoint")
    bare = "model" not in checkpoint  # the tutorial's published file: a bare state_dict
    if bare:
        checkpoint = {"model": checkpoint, "config": asdict(Config())}
    if bare and resume:
        raise SystemExit(f"error: {path!r} holds model weights only (no optimizer state); --resume needs a "
                         f"checkpoint written by train.py")
    keys = ("config", "epoch", "step", "history", "optimizer", "device", "rng") if resume else ("config",)
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise SystemExit(f"error: {path!r} has no {', '.join(missing)}: it was not written by this version of "
                         f"train.py" + (", which --resume needs" if resume else "") + ". Pass another checkpoint, "
                         "or retrain.")
    config = checkpoint["config"]
    try:
        unknown = set(config) ^ {f.name for f in fields(Config)} if isinstance(config, dict) else "not a dict"
        if unknown:
            raise ValueError(f"settings {sorted(unknown) if isinstance(unknown, set) else unknown} are not this "
                             f"version's")
        model = MixAndMatchCVAE(Config(**config).check())
    except ValueError as e:
        raise SystemExit(f"error: checkpoint {path!r} holds settings train.py refuses ({e}): it was edited or "
                         f"written by another version. Pass another checkpoint, or retrain.")
    broken = first_non_finite(checkpoint)
    if broken:  # saved by a crashed program or edited: sampling would give blank completions, training NaN
        raise SystemExit(f"error: checkpoint {path!r} holds a NaN or infinite value in {broken}: it was saved "
                         f"broken. Use an earlier checkpoint of the run, or retrain.")
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (TypeError, RuntimeError, KeyError) as e:
        # load_state_dict's first line is a header; the next names the first mismatch
        lines = [line.strip() for line in str(e).strip().splitlines()]
        sizes = "a bare state_dict, read with the tutorial's sizes" if bare else f"settings {config}"
        raise SystemExit(f"error: checkpoint {path!r} does not match MixAndMatchCVAE ({sizes}): "
                         f"{shorten_keys(lines[1] if len(lines) > 1 else lines[0])}. Pass another --checkpoint, "
                         f"or retrain.")
    return model.to(device), checkpoint


def newest_checkpoint(checkpoint_dir):
    paths = glob.glob(os.path.join(checkpoint_dir, "mix_match_*.pth"))
    if not paths:
        raise SystemExit(f"error: no checkpoint/mix_match_*.pth under {checkpoint_dir!r}; "
                         f"train one with `python3 train.py` or pass --checkpoint PATH")
    return max(paths, key=os.path.getmtime)


def shorten_keys(line, shown=3):
    """load_state_dict's 'Missing key(s) in state_dict: "a", "b", ...' with its first keys only: a
    checkpoint of another model lists every one of ours."""
    keys = re.findall(r'"([^"]+)"', line)
    if len(keys) <= shown:
        return line
    return f"{line.split(':')[0]}: {', '.join(keys[:shown])} and {len(keys) - shown} more"


def first_non_finite(tree, prefix=""):
    """The dotted name of the first floating-point tensor in a checkpoint (nested dicts and lists:
    the weights, the optimizer's moments) that holds a NaN or an infinity, else None."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
            return f"{prefix}{key}"
        found = first_non_finite(value, f"{prefix}{key}.") if isinstance(value, (dict, list)) else None
        if found:
            return found
    return None


# -----------------------------------------------------------------------------
# the measures of sample.py --metrics (samples/README.md, "The measures")

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
        # teacher-forced: p(data | z, condition, I)
        reconstruction = model.decode(z, condition_h, sampled_indices, data, condition)
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


CLASSIFIER_SEED = 0  # the digit classifier's initial weights and training draws; recorded in its cache

def digit_classifier():
    """A small CNN for the quality metrics, on flattened (B, 784) images. The one the repository
    ships (checkpoint/digit_classifier.pth, the training below on 2 threads) scores 99.13% on
    MNIST's test set."""
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


def load_or_train_classifier(path, data_root, device, epochs=4, batch_size=128, shipped=None):
    """The digit classifier cached at `path`, trained there on MNIST's training set where it is
    missing, broken or of other MNIST files (`epochs` passes over it); `shipped`, where given,
    is read in its place while `path` holds none. The repository ships one
    (checkpoint/digit_classifier.pth, as FID ships its Inception weights), so that every classifier
    measure compares across machines. Its file names the raw files it was trained on, so a
    classifier of other data (another --data-root) is never reused. It is made and trained under
    its own seed: whichever checkpoint's metrics build the cache, after whatever draws, the
    classifier is the same (on one machine and thread count), and the caller's draws do not move."""
    def load(cached):  # into a new one: a cache of other layers fails part-way, and retraining starts afresh
        if cached.get("seed") != CLASSIFIER_SEED:  # older code drew the initial weights from the caller's RNG
            raise KeyError("seed")
        with fork_generators(device):  # its initial weights are overwritten
            loaded = digit_classifier().to(device)
        loaded.load_state_dict(cached["model"])
        return loaded.eval()
    read = shipped if shipped and not os.path.isfile(path) and os.path.isfile(shipped) else path
    fingerprint = mnist_fingerprint(data_root)
    cached = load_cache(read, fingerprint, device, "retraining the digit classifier", load)
    if cached is not None:
        return cached
    print(f"training the digit classifier once ({epochs} epochs), cached at {path}", flush=True)
    train_images, train_labels = load_mnist(data_root, train=True, device=device)
    with fork_generators(device):  # the CPU's generator and the device's
        torch.manual_seed(CLASSIFIER_SEED)
        classifier = digit_classifier().to(device)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.6)
        classifier.train()
        for _ in range(epochs):
            for indices in torch.randperm(len(train_images), device=device).split(batch_size):
                loss = F.cross_entropy(classifier(random_shift(train_images[indices])), train_labels[indices])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
    atomic_save({"model": classifier.state_dict(), "mnist_sha256": fingerprint, "seed": CLASSIFIER_SEED}, path)
    return classifier.eval()


def load_cache(path, fingerprint, device, redo, load):
    """load(what the cache file holds), for a cache made from the MNIST files `fingerprint`; or None
    after printing why it is made again (`redo`): missing, made from other files (another
    --data-root), unreadable, or not loading into today's code (a cache an older version wrote,
    with other layers or keys). A broken cache, whatever the breakage, is only a cache."""
    if not os.path.isfile(path):
        return None
    try:
        cached = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001
        print(f"{redo}: cannot read {path} ({type(e).__name__})")
        return None
    if not isinstance(cached, dict):
        print(f"{redo}: {path} holds a {type(cached).__name__}, not a cache of this code")
    elif cached.get("mnist_sha256") != fingerprint:
        print(f"{redo}: {path} was made from other MNIST files")
    elif first_non_finite(cached):
        print(f"{redo}: {path} holds a NaN or infinite value")
    else:
        try:
            return load(cached)
        except Exception as e:  # noqa: BLE001
            print(f"{redo}: {path} does not fit this version of the code ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})")
    return None


def mnist_fingerprint(root):
    """SHA-256 of the four raw MNIST files under root (a fraction of a second): the data a classifier learnt."""
    digest = hashlib.sha256()
    for name in MNIST_FILES:
        with open(os.path.join(root, "MNIST", "raw", name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def classifier_log_probs(classifier, images, batch_size=2000):
    return classifier_outputs(classifier, images, batch_size)[0]


@torch.no_grad()
def classifier_outputs(classifier, images, batch_size=2000):
    """(log p(y | image) (B, 10), features (B, 128)) of the digit classifier, in one pass: its
    penultimate layer (classifier_features), and the log-probabilities its last layers read from it."""
    log_probs, features = [], []
    for batch in images.split(batch_size):
        features.append(classifier[:-2](batch))  # (b, 128)
        log_probs.append(F.log_softmax(classifier[-2:](features[-1]), dim=1))  # Dropout (off in eval), Linear
    return torch.cat(log_probs), torch.cat(features)


def classifier_features(classifier, images, batch_size=2000):
    """The digit classifier's penultimate layer: the 128 ReLU units its last Linear reads the digit
    from. Digits that the classifier tells apart lie apart here, and it was trained on MNIST, so
    this space plays for digits the part Inception's last pooling layer plays for photos in FID."""
    return classifier_outputs(classifier, images, batch_size)[1]  # (B, 128)


def knn_radii(points, ks):
    """{k: distance from each point (P, F) to its k-th nearest neighbour among the others} for each k
    in ks: the radius of its k-NN ball, the estimate of the manifold of its set near it. One
    distance matrix serves every k."""
    distances = torch.cdist(points, points)  # (P, P)
    return {k: distances.kthvalue(k + 1, dim=1).values for k in ks}  # the 1st nearest is the point itself


def manifold_measures(real, fake):
    """Fidelity and coverage of the fake set against the real one (equal sizes; features (P, F)):
    - improved precision and recall (Kynkäänniemi et al. 2019, k = 3): the share of fake points
      inside the k-NN ball of some real point, and of real points inside that of some fake point;
    - density and coverage (Naeem et al. 2020, k = 5): how many real balls hold each fake point,
      over k (about 1 for a fake set like the real one, more where fakes crowd a mode, and an
      outlier among the reals, whose ball is wide, adds little); and the share of real points
      whose ball holds some fake point (a ball around a real point, not a wide fake one)."""
    distances = torch.cdist(fake, real)  # (fake, real)
    in_real_balls = {k: distances <= radii[None] for k, radii in knn_radii(real, (3, 5)).items()}
    return {"precision": in_real_balls[3].any(1).float().mean(),
            "recall": (distances <= knn_radii(fake, (3,))[3][:, None]).any(0).float().mean(),
            "density": in_real_balls[5].sum(1).float().mean() / 5,
            "coverage": in_real_balls[5].any(0).float().mean()}


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to the points a and b (P, F) (FID, Heusel et al.
    2017, here in the digit classifier's features), in float64 on the CPU: MPS has neither float64
    nor eigh, and the matrices are only features x features."""
    a, b = a.cpu().double(), b.cpu().double()
    return gaussian_frechet_distance(a.mean(0), covariance(a), b.mean(0), covariance(b))


def covariance(points):
    """(F, F) sample covariance (n - 1) of points (P, F); torch.cov's checks need values, which the
    meta device of tests/test_devices.py does not have."""
    centred = points - points.mean(0)
    return centred.T @ centred / (len(points) - 1)


def gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b):
    """|mu_a - mu_b|^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)). The trace of the square root is
    the sum of the square roots of the eigenvalues of cov_a^(1/2) cov_b cov_a^(1/2), a symmetric
    matrix with the same eigenvalues, so torch's eigh does it (no scipy.linalg.sqrtm)."""
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross


def bottom_neighbours(test_images, train_images, m, batch_size=250):
    """Indices (N, m) of the m training images whose bottoms are nearest (Euclidean, over the 284
    pixels) to each test image's: their tops are what is plausible for that bottom, its pseudo
    ground truths (multi-modal ADE in motion prediction)."""
    train_bottoms = split_image(train_images)[1]
    return torch.cat([torch.cdist(split_image(batch)[1], train_bottoms).topk(m, dim=1, largest=False).indices
                      for batch in test_images.split(batch_size)])


def load_or_find_neighbours(path, data_root, test_images, train_images, m):
    """(indices (N_test, m) of each test image's bottom neighbours, threshold), cached at `path` for
    the MNIST files they were found in (a search of the whole training set for each test image: once
    per data set, not per checkpoint). The threshold of the conditional coverage is the median distance
    from a test image's true top to the nearest of its neighbours' tops: a completion reaches a
    plausible top when it comes as close to it as the real top comes to the nearest other."""
    def load(cached):
        indices, threshold = cached["indices"], float(cached["threshold"])
        if indices.shape != (len(test_images), m) or indices.dtype != torch.long:
            raise ValueError(f"indices {tuple(indices.shape)} of {indices.dtype}, where ({len(test_images)}, {m}) "
                             f"of torch.int64 belong")
        return indices, threshold
    fingerprint = mnist_fingerprint(data_root)
    cached = load_cache(path, fingerprint, test_images.device, "finding the bottom neighbours again", load)
    if cached is not None:
        return cached
    print(f"finding the {m} training images nearest to each test image by its bottom once, cached at {path}",
          flush=True)
    indices = bottom_neighbours(test_images, train_images, m)
    tops, neighbour_tops = split_image(test_images)[0], split_image(train_images[indices])[0]
    threshold = (neighbour_tops - tops[:, None]).norm(dim=2).min(1).values.median().item()
    atomic_save({"indices": indices, "threshold": threshold, "mnist_sha256": fingerprint}, path)
    return indices, threshold


def multimodal_distances(completions, neighbour_tops, threshold):
    """completions (N, K, D), neighbour_tops (N, M, D). Per condition (N,): the multi-modal best-of-K,
    the mean over the M neighbours of the distance from the completion closest to it; and the
    conditional coverage, the share of the M that some completion comes within `threshold` of."""
    closest = torch.cdist(neighbour_tops, completions).min(2).values  # (N, M)
    return closest.mean(1), (closest <= threshold).float().mean(1)


# -----------------------------------------------------------------------------
# figures and image grids

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

    # fixed margins: tight_layout would measure every label on each drawing, a third of its time
    fig, (loss_ax, kl_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={
        "left": 0.06, "right": 0.94, "bottom": 0.12, "top": 0.92, "wspace": 0.22})
    weight_ax = kl_ax.twinx()
    for (name, history), color in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        epochs = [h["epoch"] for h in history]
        dots = {"color": color, "marker": "o", "markersize": 2.5}  # visible from the first epoch on
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

    extension = os.path.splitext(path)[1].lstrip(".")
    atomic_write(path, lambda f: fig.savefig(f, format=extension, **savefig_kwargs))
    plt.close(fig)


def save_image_grid(images, path, nrow):
    """(B, 784) images as a grid of nrow per row, written atomically: torchvision's make_grid with
    save_image's rounding, stored as 8-bit grayscale. save_image stores the grid's three identical
    channels as RGB; one channel holds the same pixels in half the bytes, and a PNG encodes 3x faster."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(to_grid_images(images).cpu(), nrow=nrow)[0]  # (H, W): channel 0 of three copies
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    name = pil_format(os.path.splitext(path)[1])  # the writer --out was checked against
    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format=name))


def to_grid_images(flat):
    """(B, 784) -> (B, 1, 28, 28) for torchvision.utils.save_image / make_grid."""
    return flat.reshape(-1, 1, 28, 28)


def image_formats():
    """Extensions (without the dot) save_image_grid can write to."""
    from PIL import Image

    return {extension.lstrip(".") for extension in Image.registered_extensions() if pil_format(extension)}


def pil_format(extension):
    """PIL's name of the format an extension names (".jpg": "JPEG") if PIL can write our 8-bit
    grayscale grids in it (tried on a 1-pixel image), else None: no writer, a missing plug-in, or
    no grayscale. The common formats come first: importing every plug-in takes a good part of a second."""
    from PIL import Image

    extension = extension.lower()
    Image.preinit()  # PNG, JPEG, BMP, GIF, PPM
    if extension not in Image.EXTENSION:
        Image.init()
    name = Image.EXTENSION.get(extension)
    try:
        with warnings.catch_warnings():  # a writer PIL says it will remove (IM in Pillow 13) is not offered
            warnings.simplefilter("error", DeprecationWarning)
            Image.new("L", (1, 1)).save(io.BytesIO(), format=name)  # name None: PIL refuses, as for no writer
    except (KeyError, OSError, ValueError, DeprecationWarning):
        return None
    return name


def figure_formats():
    """Extensions matplotlib's savefig writes (with the Agg backend)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


# -----------------------------------------------------------------------------
# safeguards that change no number: argument types, devices and generators, file checks, atomic
# writes and what their errors mean, signals, locks

def positive_int(text):
    """argparse type: a whole number >= 1, else argparse's one-line usage error."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def seed(text):
    """argparse type: a seed every generator takes, 0 to 2**32 - 1 (numpy's range)."""
    value = int(text) if text.isascii() and text.isdigit() else None
    if value is None or value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {2 ** 32 - 1}, got {text!r}")
    return value


def given(text):
    """argparse type: a name or a path, not an empty string (what an unset shell variable gives)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a name or a path, got an empty string (an unset shell variable?)")
    return text


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def get_device(name):
    """'auto' picks CUDA where available, else Apple's MPS, else the CPU; otherwise 'cpu', 'cuda',
    'cuda:N' or 'mps', checked here so that a typo ends in one line before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):  # torch's message lists every backend it was built with
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: --device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for CUDA, which is not available here; "
                         f"use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} asked for Apple's MPS, which is not available here (it needs a Mac "
                         f"with Apple silicon and macOS 12.3 or later); use --device cpu or auto")
    return device


def add_device_flags(parser):
    """--device, and the numerics on it, for train.py and sample.py."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA where available, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or "
                             "mps (default: auto)")
    parser.add_argument("--tf32", action="store_true",
                        help="on a GPU, let cuDNN (the recurrent decoder's GRU, the digit classifier's convolutions) "
                             "and matrix products compute in TensorFloat-32: faster, with 10 of float32's 23 mantissa "
                             "bits (default: float32 everywhere)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms only (torch.use_deterministic_algorithms, cuBLAS's "
                             "deterministic workspace), so that a seeded run on a GPU repeats bit for bit, at some "
                             "speed; a CPU run repeats without it (default: off)")


def setup_device(args):
    """The device of --device, with the numerics the flags ask for set before any work on it."""
    set_numerics(args.tf32, args.deterministic)
    return get_device(args.device)


def set_numerics(tf32=False, deterministic=False):
    """Float32 is float32 on every device unless TF32 is asked for: in the installed torch cuDNN
    computes convolutions and recurrent layers in TensorFloat-32 by default (matrix products do
    not), so the GRU and the classifier would not compute what a CPU computes. `deterministic`
    makes torch refuse the nondeterministic algorithms (cuDNN's GRU and convolutions among those
    documented as such) for deterministic ones; CUBLAS_WORKSPACE_CONFIG is set before cuBLAS starts."""
    precision = "tf32" if tf32 else "ieee"
    cudnn = torch.backends.cudnn
    cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = precision
    torch.backends.cuda.matmul.fp32_precision = precision
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        cudnn.benchmark = False


def fork_generators(device):
    """torch.random.fork_rng of the CPU's generator and of the one that work on `device` draws from
    (a GPU's, or Apple's MPS's), and no other: fork_rng alone forks every GPU's, with a warning
    where there are several."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=forked_devices(device), device_type="mps" if device.type == "mps" else "cuda")


def forked_devices(device):
    """The devices of `device`'s type whose generators work on `device` draws from: one GPU, MPS's
    one, or none (the CPU's is always forked)."""
    device = torch.device(device)
    if device.type == "mps":
        return [0]
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def writable_dir(path, flag, derived=None):
    """Make the folder `path` if needed and check that a file can be created in it, before any
    work: a wrong path should cost nothing, not the first trained epoch. `path` is the flag's; or,
    with `derived` (what goes there), a folder the command derives from one, named by its cause."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if derived:
            raise SystemExit(f"error: {explain_os_error(OSError(e.errno, e.strerror, path))}; it is where {derived} "
                             f"go (under {flag})")
        raise SystemExit(f"error: cannot write in the folder {path!r} ({e.strerror}); pass another {flag}")


def check_output_file(path, flag, formats):
    """An output file's extension must name one of `formats`, and its folder must be writable."""
    root, extension = os.path.splitext(path)
    if os.path.isdir(path):
        example = "png" if "png" in formats else min(formats)
        raise SystemExit(f"error: {flag} {path!r} is a folder; pass a file name, e.g. "
                         f"{os.path.join(path, 'out.' + example)}")
    if extension.lower().lstrip(".") not in formats:
        shown = [f for f in ("png", "jpg", "pdf", "svg") if f in formats] or sorted(formats)
        more = f" and {len(formats) - len(shown)} more" if len(formats) > len(shown) else ""
        problem = f"cannot write the format {extension!r}" if extension else "no extension to name its format"
        raise SystemExit(f"error: {flag} {path!r}: {problem}; use e.g. {root}.{shown[0]}"
                         + (f" (it writes {', '.join(shown)}{more})" if len(formats) > 1 else ""))
    writable_dir(os.path.dirname(path) or ".", flag)


WINDOWS = os.name == "nt"  # where a lock's process, a held file and a command line are handled otherwise

def save_json(obj, path, indent=1):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path, write):
    """write(f) into a .tmp file of its own beside `path`, then rename it over `path`. Ctrl-C, a
    crash or a full disk leaves the old file or the new one, both whole, and no .tmp; the OSError
    then names `path`. Two processes writing the same file (two sample.py runs building one cache)
    each write their own .tmp, so the file is one of theirs, whole. Written through a Python file so
    that a full disk is an OSError (torch.save to a path reports it as an opaque RuntimeError of its
    zip writer)."""
    write_all({path: write})


def write_all(writes):
    """{path: write(f)}, all or nothing: each written as atomic_write does, into a .tmp file beside
    its path, and only once every one is whole (and no path is a folder), each renamed over its
    path. A failure before the renames (a full disk, a folder where a file belongs, Ctrl-C) leaves
    every path as it was and no .tmp; the OSError names the path it met."""
    staged, path = {}, None
    with signals_deferred():
        try:
            for path, write in writes.items():
                if os.path.isdir(path):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                # a name of its own, which newest_checkpoint's mix_match_*.pth does not match
                tmp = f"{secrets.token_hex(4)}.{os.path.basename(path)}.tmp"
                staged[path] = os.path.join(os.path.dirname(path), tmp)
                with open(staged[path], "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave it empty
            for path in list(staged):
                replace(staged[path], path)
                del staged[path]  # renamed: no .tmp to remove
        except BaseException as e:
            for tmp in staged.values():
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            # torch.save's zip writer turns the OSError of a full disk into a RuntimeError of its own
            # as it closes; the OSError is that exception's context
            cause = next((x for x in (e, e.__context__) if isinstance(x, OSError)), None)
            if cause is not None:
                raise type(cause)(cause.errno, cause.strerror, path) from e  # a HeldOpenError stays one
            raise


class HeldOpenError(PermissionError):
    """A file that another program holds open, which Windows does not let us replace."""


def replace(tmp, path, tries=20, wait_s=0.25):
    """os.replace(tmp, path). On Windows a file another program holds open (an image viewer showing
    results/curves.png) cannot be replaced: there it is tried again for a few seconds, then refused
    with a HeldOpenError."""
    for attempt in range(tries):
        try:
            return os.replace(tmp, path)
        except PermissionError as e:
            if not WINDOWS:
                raise
            if attempt == tries - 1:
                raise HeldOpenError(e.errno, f"another program holds it open (tried for {tries * wait_s:g} s)",
                                    path) from e
            time.sleep(wait_s)


def explain_os_error(e):
    """An OSError met writing (or reading) a file, as the user can act on it: its path, its cause
    and what to do, for the caller to end with what happens next. The errors a user meets are told
    apart by their errno; any other is in the system's own words."""
    path = e.filename or "a file"
    if isinstance(e, HeldOpenError):
        return f"{path}: another program holds it open, so it cannot be replaced: close it (an image viewer, an editor)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: the disk is full ({e.strerror}): free space"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: cannot be written there ({e.strerror}): make it writable, or pass another path"
    if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return (f"{path}: a folder stands where a file belongs, or a file where a folder belongs ({e.strerror}): "
                f"move it aside, or pass another path")
    return f"{path}: {e.strerror or e}"


def shell_command(words):
    """A command line to paste into this system's shell: quoted for cmd.exe on Windows (which keeps
    single quotes), for a POSIX shell elsewhere."""
    return subprocess.list2cmdline(words) if WINDOWS else shlex.join(words)


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver them. A KeyboardInterrupt
    raised inside torch.save's writer would surface as a RuntimeError of its zip writer, after a
    half-written file; held, it arrives once the files of the block are whole."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    received = []
    handlers = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])  # now handled as usual: KeyboardInterrupt, say
