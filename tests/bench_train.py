"""
Benchmark (not a test): our train.py training loop against the tutorial's pipeline, same model
and recipe, timed side by side in one process.

The reference loop is the tutorial's: torchvision MNIST through transforms.ToTensor and
DataLoader(batch_size=128, shuffle=True, num_workers=0), images reshaped per batch, Resampling
built from a zeros tensor and two indexed assignments, torch's BCE and torch's default Adam.
Both loops see the same batches and Sampling draws for a seed (tests/test_speed_path.py checks
they agree).

    python3 tests/bench_train.py --data-root ../shared/data
"""
import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

from model import MixAndMatchCVAE  # noqa: E402
from sample import completion_grid  # noqa: E402
from train import anneal_weight, train_epoch  # noqa: E402
from utils import get_device, kl_divergence, load_mnist, mnist_dataset, split_image  # noqa: E402


class TutorialModel(MixAndMatchCVAE):
    """The same network with the tutorial's Resampling: a fresh zeros tensor, two assignments."""

    @staticmethod
    def resampling(at_sampled, at_complementary, sampled_indices):
        is_sampled = torch.zeros(at_sampled.shape[1], dtype=torch.bool, device=at_sampled.device)
        is_sampled[sampled_indices] = True
        complementary_indices = (~is_sampled).nonzero().squeeze(1)  # the tutorial gets it from Sampling
        fused = torch.zeros_like(at_sampled)
        fused[:, sampled_indices] = at_sampled[:, sampled_indices]
        fused[:, complementary_indices] = at_complementary[:, complementary_indices]
        return fused


def tutorial_epoch(model, optimizer, loader, alpha, step, device):
    """The tutorial's training loop; returns (BCE per image, KL per image, step) like train_epoch."""
    model.train()
    rec_sum = kl_sum = 0.0
    for images, _ in loader:
        data, condition = split_image(images.view(images.shape[0], -1).to(device))
        reconstruction, mu, logvar = model(data, condition, alpha)
        bce = F.binary_cross_entropy(reconstruction, data, reduction="sum")  # torch's BCE, as the tutorial
        kl = kl_divergence(mu, logvar).sum()
        loss = bce + anneal_weight(step) * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        rec_sum += bce.item()
        kl_sum += kl.item()
    return rec_sum / len(loader.dataset), kl_sum / len(loader.dataset), step


def tutorial_loader(data_root, batch_size):
    dataset = mnist_dataset(data_root, train=True)  # torchvision's MNIST, with our message if missing
    dataset.transform = transforms.ToTensor()
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)


def training_flops_per_image(model):
    """FLOPs of the Linear layers for one training image (2 per multiply-add; the condition is
    encoded once): forward, weight gradient and input gradient, except that the first layer of
    each encoder needs no input gradient (its input is pixels)."""
    first_layers = {model.data_encoder[0], model.condition_encoder[0]}
    return sum((2 if m in first_layers else 3) * 2 * m.in_features * m.out_features
               for m in model.modules() if isinstance(m, torch.nn.Linear))


def framework_seconds_per_step(device, images, alpha, steps=200):
    """train_epoch at batch 2, per step: the arithmetic is next to nothing, so this is the
    framework's time per step (Python, dispatch, autograd, Adam), which batch 128 pays too."""
    model = MixAndMatchCVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    train_epoch(model, optimizer, images[:2 * steps], 2, alpha, 0)  # warm-up
    return timed(device, train_epoch, model, optimizer, images[:2 * steps], 2, alpha, 0) / steps


def matmul_gflops(device, n=2048, repeats=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        if i >= 2:  # the first two warm up
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, *args):
    synchronize(device)
    t0 = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline, after one warm-up (default: 2)")
    parser.add_argument("--device", default="auto", help="(default: auto)")
    args = parser.parse_args()
    device = get_device(args.device)
    batch_size, lr, alpha = 128, 1e-4, 64

    torch.manual_seed(0)
    images, _ = load_mnist(args.data_root, train=True, device=device)
    ours = MixAndMatchCVAE().to(device)
    ours_optimizer = torch.optim.Adam(ours.parameters(), lr=lr, fused=True)
    loader = tutorial_loader(args.data_root, batch_size)
    tutorial = TutorialModel().to(device)
    tutorial_optimizer = torch.optim.Adam(tutorial.parameters(), lr=lr)

    times = {"ours": [], "tutorial": []}
    for epoch in range(args.epochs + 1):  # interleaved, so that machine noise hits both alike
        step = epoch * len(loader)  # the KL weight's step, as in a real run
        t_ours = timed(device, train_epoch, ours, ours_optimizer, images, batch_size, alpha, step)
        t_tutorial = timed(device, tutorial_epoch, tutorial, tutorial_optimizer, loader, alpha, step, device)
        if epoch > 0:  # epoch 0 warms up
            times["ours"].append(t_ours)
            times["tutorial"].append(t_tutorial)
    ours_s, tutorial_s = statistics.median(times["ours"]), statistics.median(times["tutorial"])

    test_images, _ = load_mnist(args.data_root, train=False, device=device)
    ours.eval()
    sample_s = statistics.median(timed(device, completion_grid, ours, test_images[:20], alpha, 18) for _ in range(5))

    peak = matmul_gflops(device)
    flops = training_flops_per_image(ours)
    model_gflops = flops * len(images) / ours_s / 1e9
    # a floor for eager PyTorch at this batch size: framework time plus the matmuls at full speed
    framework_s = len(loader) * framework_seconds_per_step(device, images, alpha)
    matmul_s = flops * len(images) / (peak * 1e9)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    threads = torch.get_num_threads()
    print(f"device {device}, {os.cpu_count()} CPU cores, {threads} torch threads, torch {torch.__version__}")
    print(f"median of {args.epochs} epochs after 1 warm-up, batch {batch_size}, {len(images)} images per epoch")
    print(f"{'pipeline':<32} {'s/epoch':>8} {'images/s':>9}")
    print(f"{'tutorial (DataLoader+ToTensor)':<32} {tutorial_s:8.2f} {len(images) / tutorial_s:9.0f}")
    print(f"{'ours (train.py)':<32} {ours_s:8.2f} {len(images) / ours_s:9.0f}")
    print(f"speed-up: {tutorial_s / ours_s:.2f}x")
    print(f"model: {flops / 1e6:.2f} MFLOP per image (train), "
          f"{model_gflops:.1f} GFLOP/s achieved = {100 * model_gflops / peak:.0f}% of "
          f"{peak:.0f} GFLOP/s measured on a 2048 x 2048 matmul")
    print(f"eager floor: {framework_s:.2f} s framework time ({len(loader)} steps as timed at batch 2) + "
          f"{matmul_s:.2f} s of matmul at the measured peak = {framework_s + matmul_s:.2f} s/epoch, "
          f"so at most {tutorial_s / (framework_s + matmul_s):.2f}x")
    print(f"sample.py grid (20 x 18 completions): {1000 * sample_s:.1f} ms")
    print(f"peak RSS of this process (both pipelines): {rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
