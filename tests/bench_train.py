"""
Benchmark (not a test): first an epoch of each decoder against the MLP decoder's; then our
train.py training loop against the tutorial's pipeline, same model and recipe, timed side by side
in one process; then train.py's own main() for a whole default run (--run-epochs), to show what a
run spends outside the training loop.

The reference loop is the tutorial's: torchvision MNIST through transforms.ToTensor and
DataLoader(batch_size=128, shuffle=True, num_workers=0), images reshaped per batch, Resampling
built from a zeros tensor and two indexed assignments, torch's BCE and torch's default Adam.
Both loops see the same batches and Sampling draws for a seed (tests/test_speed_path.py checks
they agree).

    python3 tests/bench_train.py --data-root ../shared/data [--decoders-only]

Notes for whoever optimises this next (2 CPU cores; README, Speed, has the summary):
- What each change bought, in one process, alternating epochs of four variants, median of four
  rounds (a one-off script, machine loaded, ~1.65 s per epoch): the whole-tensor BCE forward 6%,
  images.index_select instead of images[indices] 4.5%, both 8.6%. On a batch from the trained
  model torch's BCE forward took 240 us and ours 88 us; torch's calls log1p one element at a
  time on a CPU (343 us for 64,000 values, against 26 us for log).
- Measured and dropped: torch.compile of forward and loss (with fallback_random, so that the
  draws stay torch's) compiles for 14 s and saves ~0.4 ms a step, 0.2 s an epoch, so 50 epochs
  never win it back; ReLU(inplace=True), zero_grad(set_to_none=False) and a single KL reduction
  change nothing measurable; OMP_WAIT_POLICY=PASSIVE is 3.7x slower, one thread 1.5x slower.
- Fused Adam gives the same per-step losses; weights differ from the default Adam's by at most
  1.2e-7, except the biases of Linear layers that feed a BatchNorm (up to 9e-3): their gradient
  is ~0, Adam's normalised step amplifies rounding, and BatchNorm subtracts them.
- The "eager floor" line: a whole training step at batch 2 (no arithmetic to speak of: Python,
  dispatch, autograd and Adam, which batch 128 pays too) times the steps of an epoch, plus the
  model's matmul FLOPs at the speed of a 2048 x 2048 matmul. The FLOP count is exact for the
  Linear layers (forward, weight and input gradients; the encoders' first layers take pixels and
  need no input gradient): 1.52 MFLOP per image, where the usual 3 x forward would say 1.85.
- The recurrent decoder (2 cores of an AMD EPYC): nn.GRU on a CPU runs frame by frame through
  autograd. A GRU written out as one autograd.Function (its backward by hand, each weight
  gradient one matmul over the 18 frames; values and gradients within 1e-14 of nn.GRU's in
  float64) was measured in one-off scripts and dropped: alone, forward and backward took 8.0 ms a
  batch against nn.GRU's 8.3; in the model's training step, interleaved, 17.4 ms against 14.8
  (tanh alone of a 128 x 128 block: 21 us). The floor line (its GRU free + the GRU's matmuls
  alone) says how far any implementation could go.
- Outside the loop, per epoch, each timed alone beside a 1.67 s loop: evaluation 42 ms, the
  reconstruction grid 9 ms (RGB, before the grids became grayscale), the checkpoint 8 ms, the
  curves 180 ms (hence train.py's CURVES_EVERY_S). Evaluation and the
  grid draw Samplings and latents from the generator, so they stay every epoch: moving them would
  change every seeded run.
"""
import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms

import train
from model import FRAME, Config, MixAndMatchCVAE, kl_divergence, split_image
from sample import completion_grid
from train import anneal_weight, train_epoch
from utils import get_device, given, load_mnist, mnist_dataset, positive_int


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
    config = Config(batch_size=2, alpha=alpha)
    train_epoch(model, optimizer, images[:2 * steps], config, 0)  # warm-up
    return timed(device, train_epoch, model, optimizer, images[:2 * steps], config, 0) / steps


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


def whole_run(data_root, device, epochs, flags=()):
    """train.py's main() for `epochs` epochs with `flags`, in a temporary folder, with its
    train_epoch timed. Returns seconds per epoch: the wall time from the first epoch's start to
    main()'s end (so evaluation, figures and checkpoints included, data loading not), and the
    loop's own; and the run's history."""
    loop, starts = [], []

    def timed_train_epoch(*args):
        starts.append(time.perf_counter())
        result = train_epoch(*args)
        synchronize(device)
        loop.append(time.perf_counter() - starts[-1])
        return result

    with tempfile.TemporaryDirectory() as folder:
        argv = ["train.py", "--data-root", data_root, "--device", str(device), "--epochs", str(epochs),
                "--checkpoint-dir", f"{folder}/checkpoint", "--results-dir", f"{folder}/results", *flags]
        with mock.patch.object(train, "train_epoch", timed_train_epoch), mock.patch.object(sys, "argv", argv), \
                contextlib.redirect_stdout(io.StringIO()):
            train.main()
        end = time.perf_counter()
        with open(f"{folder}/results/history.json", encoding="utf-8") as f:
            history = json.load(f)
    return (end - starts[0]) / epochs, sum(loop) / epochs, history


def decoder_seconds(images, device, epochs, batch_size, alpha):
    """{decoder: train.py's train_epoch seconds per epoch}, epochs interleaved across the decoders,
    the median after one warm-up. The recurrent decoder teacher-forced (one GRU call, its
    schedule's first epoch) and at a teacher-forcing probability of 0.5 (row by row, as every
    later epoch of the schedule runs); and, for the floor of a recurrent epoch, the same model with
    its GRU free (FreeGRU) and the GRU's matmuls alone, an epoch's worth."""
    variants = {"mlp": ("mlp", 1.0), "autoregressive": ("autoregressive", 1.0),
                "recurrent, teacher-forced": ("recurrent", 1.0), "recurrent, schedule at 0.5": ("recurrent", 0.5),
                "recurrent, its GRU free": ("recurrent", 1.0)}
    models = {name: MixAndMatchCVAE(Config(decoder=decoder)).to(device) for name, (decoder, _) in variants.items()}
    models["recurrent, its GRU free"].data_decoder.gru = FreeGRU()
    config = Config(batch_size=batch_size, alpha=alpha)
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-4, fused=True) for name, model in models.items()}
    times = {name: [] for name in [*variants, "its GRU's matmuls alone"]}
    for epoch in range(epochs + 1):
        for name, (_, teacher_forcing) in variants.items():
            models[name].data_decoder.teacher_forcing = teacher_forcing  # as the schedule sets it
            t = timed(device, train_epoch, models[name], optimizers[name], images, config,
                      epoch * len(images) // batch_size)
            if epoch > 0:
                times[name].append(t)
        t = timed(device, gru_matmuls, device, len(images) // batch_size, batch_size, Config().hidden_dim)
        if epoch > 0:
            times["its GRU's matmuls alone"].append(t)
    return {name: statistics.median(t) for name, t in times.items()}


class FreeGRU(torch.nn.Module):
    """Stands in for the recurrent decoder's GRU at next to no cost, every state the initial one:
    an epoch with it is what a recurrent epoch spends outside its GRU."""

    def forward(self, inputs, state):
        return state[0, :, None].expand(-1, inputs.shape[1], -1) * 1.0, state


def gru_matmuls(device, batches, batch_size, hidden_dim, frames=18):
    """The matmuls of the recurrent decoder's GRU over `batches` training steps, which no GRU
    implementation can skip: forward, every frame's input part in one matmul and the hidden part
    frame by frame; backward, the state's gradient frame by frame and each weight's gradient in one
    matmul over all frames. With the epoch of FreeGRU, a floor for a recurrent epoch."""
    h, gates = torch.randn(batch_size, hidden_dim, device=device), 3 * hidden_dim
    weight_hh, bias = torch.randn(gates, hidden_dim, device=device), torch.randn(gates, device=device)
    weight_ih, inputs = torch.randn(gates, FRAME, device=device), torch.rand(frames * batch_size, FRAME, device=device)
    grad_gates = torch.randn(batch_size, gates, device=device)
    all_grad_gates, states = (torch.randn(frames * batch_size, n, device=device) for n in (gates, hidden_dim))
    for _ in range(batches):
        torch.addmm(bias, inputs, weight_ih.t())
        for _ in range(frames):
            torch.addmm(bias, h, weight_hh.t())
        for _ in range(frames):
            torch.addmm(h, grad_gates, weight_hh)
        all_grad_gates.t() @ states, all_grad_gates.t() @ inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=given, default="./data",
                        help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--epochs", type=positive_int, default=2,
                        help="timed epochs per pipeline, after one warm-up (default: 2)")
    parser.add_argument("--run-epochs", type=positive_int, default=50,
                        help="epochs of train.py's main() for the whole-run line; the default run's 50, since "
                             "its one-off costs (importing matplotlib, the last drawing) weigh on a short run "
                             "(default: 50)")
    parser.add_argument("--device", default="auto", help="(default: auto)")
    parser.add_argument("--decoders-only", action="store_true",
                        help="time an epoch of each decoder against the MLP's, and nothing else")
    args = parser.parse_args()
    device = get_device(args.device)
    batch_size, lr, alpha = 128, 1e-4, 64

    torch.manual_seed(0)
    images, _ = load_mnist(args.data_root, train=True, device=device)
    decoders = decoder_seconds(images, device, args.epochs, batch_size, alpha)
    print(f"train_epoch per decoder, median of {args.epochs} epochs after 1 warm-up, {torch.get_num_threads()} torch "
          f"threads:\n" + "\n".join(f"{name:<32} {seconds:8.2f} s/epoch  {seconds / decoders['mlp']:.2f}x the mlp's"
                                    for name, seconds in decoders.items()), flush=True)
    floor = decoders["recurrent, its GRU free"] + decoders["its GRU's matmuls alone"]
    print(f"{'recurrent floor (free + matmuls)':<32} {floor:8.2f} s/epoch  {floor / decoders['mlp']:.2f}x the mlp's",
          flush=True)
    if args.decoders_only:
        return
    ours = MixAndMatchCVAE().to(device)
    ours_optimizer = torch.optim.Adam(ours.parameters(), lr=lr, fused=True)
    loader = tutorial_loader(args.data_root, batch_size)
    tutorial = TutorialModel().to(device)
    tutorial_optimizer = torch.optim.Adam(tutorial.parameters(), lr=lr)

    times = {"ours": [], "tutorial": []}
    for epoch in range(args.epochs + 1):  # interleaved, so that machine noise hits both alike
        step = epoch * len(loader)  # the KL weight's step, as in a real run
        t_ours = timed(device, train_epoch, ours, ours_optimizer, images, Config(batch_size=batch_size, alpha=alpha),
                       step)
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
    run_s, run_loop_s, _ = whole_run(args.data_root, device, args.run_epochs)
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
    print(f"train.py main(), {args.run_epochs} epochs: {run_s:.2f} s per epoch, of which the training loop "
          f"{run_loop_s:.2f} s: {100 * (run_s / run_loop_s - 1):.1f}% outside it (evaluation, figures, checkpoint)")
    print(f"sample.py grid (20 x 18 completions): {1000 * sample_s:.1f} ms")
    print(f"peak RSS of this process (both pipelines): {rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
