"""
What README promises on a GPU, checked once by a maintainer who has one (not a test):

    python3 tests/gpu_check.py --data-root ../shared/data

1. No synchronisation inside a training step: a few hundred steps of each decoder on CUDA under
   torch.cuda.set_sync_debug_mode("warn"), counting the synchronising calls beyond the epoch's
   end (its two losses read once); the count per step must be 0.
2. The seconds of an epoch of each decoder on CUDA, beside the CPU's.
3. sample.py --metrics on CUDA from the shipped checkpoint: it runs (its draws differ from a CPU's).
4. --deterministic: a seeded run of each decoder repeats bit for bit, and a run resumed after its
   first epoch ends where the uninterrupted one does (README's promise). Without the flag, whether
   a repeat is equal is shown, not required.

It prints one table and exits 1 when a promise fails, 2 where there is no GPU.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch

from model import MixAndMatchCVAE, ModelConfig
from train import train_epoch
from utils import load_mnist, set_numerics

DECODERS = {"mlp": [], "autoregressive": ["--decoder", "autoregressive"],
            "recurrent": ["--decoder", "recurrent", "--teacher-forcing-epochs", "2"]}
END_OF_EPOCH_SYNCS = 2  # train_epoch reads its two losses once, after the last step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per decoder for check 1 (default: 200)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU here (torch.cuda.is_available() is False): nothing to check; run this on a machine with CUDA")
        sys.exit(2)
    set_numerics()  # float32, as train.py and sample.py have it
    rows, failed = [], []
    cpu_images = load_mnist(args.data_root, train=True, device=torch.device("cpu"))[0]
    gpu_images = cpu_images.to("cuda")
    for name, flags in DECODERS.items():
        config = ModelConfig(decoder=name)
        syncs, steps = count_syncs(config, gpu_images[:128 * args.steps])
        gpu, cpu = (epoch_seconds(config, images) for images in (gpu_images, cpu_images))
        repeats, resumes = deterministic_runs(args.data_root, flags, ["--deterministic"])
        plain_repeats, _ = deterministic_runs(args.data_root, flags, [], resume=False)
        rows.append((name, f"{syncs / steps:.2f}", f"{gpu:.2f}", f"{cpu:.2f}", yes(repeats), yes(resumes),
                     yes(plain_repeats)))
        failed += [f"{name}: {what}" for what, ok in [("synchronises inside a step", syncs == 0),
                                                       ("--deterministic does not repeat", repeats),
                                                       ("--deterministic --resume does not continue", resumes)]
                   if not ok]
    metrics_seconds, metrics_ok = sample_metrics(args.data_root)
    failed += [] if metrics_ok else ["sample.py --metrics failed on CUDA"]
    header = ("decoder", "syncs/step", "GPU s/epoch", "CPU s/epoch", "repeats", "resume exact", "repeats w/o flag")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; CPU: {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{cell:>{len(title)}}" for cell, title in zip(row, header)))
    print(f"sample.py --metrics on CUDA: {'ran' if metrics_ok else 'FAILED'} in {metrics_seconds:.0f} s")
    if failed:
        print("promises that fail: " + "; ".join(failed))
        sys.exit(1)
    print("every promise holds")


def yes(ok):
    return "yes" if ok else "no"


def count_syncs(config, images):
    """(synchronising calls inside the steps, steps) of one train_epoch over `images` on CUDA."""
    torch.manual_seed(0)
    model = MixAndMatchCVAE(config).to("cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    train_epoch(model, optimizer, images[:256], 128, 64, 0)  # warm-up: the first call's allocations and handles
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(model, optimizer, images, 128, 64, 0, None, 0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return syncs - END_OF_EPOCH_SYNCS, len(images) // 128


def epoch_seconds(config, images):
    torch.manual_seed(0)
    model = MixAndMatchCVAE(config).to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    train_epoch(model, optimizer, images[:1280], 128, 64, 0)  # warm-up
    t0 = time.time()
    train_epoch(model, optimizer, images, 128, 64, 0)  # its .item() waits for the GPU's last step
    return time.time() - t0


def train(data_root, folder, flags, epochs, *extra):
    subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data-root", data_root, "--device", "cuda",
                    "--checkpoint-dir", os.path.join(folder, "ck"), "--results-dir", os.path.join(folder, "res"),
                    "--epochs", str(epochs), *flags, *extra], check=True, capture_output=True)
    return torch.load(os.path.join(folder, "ck", f"mix_match_{epochs:02d}.pth"), map_location="cpu",
                      weights_only=True)["model"]


def deterministic_runs(data_root, flags, determinism, resume=True):
    """(does a seeded 2-epoch run repeat bit for bit, does a run resumed after epoch 1 end there)."""
    with tempfile.TemporaryDirectory() as scratch:
        first, second = (train(data_root, os.path.join(scratch, name), [*flags, *determinism], 2)
                         for name in ("a", "b"))
        repeats = all(torch.equal(first[k], second[k]) for k in first)
        if not resume:
            return repeats, None
        train(data_root, os.path.join(scratch, "c"), [*flags, *determinism], 1)
        resumed = train(data_root, os.path.join(scratch, "d"), determinism, 2, "--resume",
                        os.path.join(scratch, "c", "ck", "mix_match_01.pth"))
        return repeats, all(torch.equal(first[k], resumed[k]) for k in first)


def sample_metrics(data_root):
    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.time()
        result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--data-root", data_root, "--device",
                                 "cuda", "--checkpoint", os.path.join(REPO, "checkpoint", "mix_match_50.pth"),
                                 "--metrics", "--out", os.path.join(scratch, "g.png"), "--cache-dir", scratch],
                                capture_output=True, text=True, check=False)
        return time.time() - t0, result.returncode == 0


if __name__ == "__main__":
    main()
