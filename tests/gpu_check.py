"""
What README promises on a GPU, checked and measured once by a maintainer who has one (not a test):

    python3 tests/gpu_check.py --data-root ../shared/data [--out DIR]

First what is timed, one thing at a time:
1. No synchronisation inside a training step: a few hundred steps of each decoder on CUDA under
   torch.cuda.set_sync_debug_mode("warn"), counting the synchronising calls beyond the epoch's
   end (its two losses read once); the count per step must be 0.
2. The seconds of an epoch of each decoder on CUDA, beside this machine's CPU.
3. The default `train.py` for its 50 epochs on CUDA: the median epoch and the last test loss.
4. `sample.py --metrics` on CUDA from the shipped checkpoint: its seconds, and its JSON in --out
   (its draws differ from a CPU's, so its numbers are close to the CPU's, not equal).
Then, in parallel processes (nothing timed):
5. --deterministic: a seeded run of each decoder repeats bit for bit, and a run resumed after its
   first epoch ends where the uninterrupted one does (README's promise). Without the flag, whether
   a repeat is equal is shown, not required.
6. The default 50-epoch run twice with --deterministic: bit for bit?

It prints its tables and exits 1 when a promise fails, 2 where there is no GPU.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

from model import Config, MixAndMatchCVAE
from train import train_epoch
from utils import given, load_mnist, positive_int, set_numerics, writable_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DECODERS = {"mlp": [], "autoregressive": ["--decoder", "autoregressive"],
            "recurrent": ["--decoder", "recurrent", "--teacher-forcing-epochs", "2"]}
END_OF_EPOCH_SYNCS = 2  # train_epoch reads its two losses once, after the last step
EPOCH_LINE = re.compile(r"epoch +\d+ \|.*\| test loss +([\d.]+) \| +([\d.]+) s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=given, default="./data",
                        help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--steps", type=positive_int, default=200,
                        help="training steps per decoder for check 1 (default: 200)")
    parser.add_argument("--out", type=given, help="folder for sample.py's grid and metrics JSON (default: none kept)")
    parser.add_argument("--workers", type=positive_int, default=6, help="parallel runs of checks 5 and 6 (default: 6)")
    args = parser.parse_args()
    if args.out:
        writable_dir(args.out, "--out")
    if not torch.cuda.is_available():
        print("no GPU here (torch.cuda.is_available() is False): nothing to check; run this on a machine with CUDA")
        sys.exit(2)
    set_numerics()  # float32, as train.py and sample.py have it
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; CPU: "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads", flush=True)
    rows, failed = {}, []
    cpu_images = load_mnist(args.data_root, train=True, device=torch.device("cpu"))[0]
    gpu_images = cpu_images.to("cuda")
    for name in DECODERS:
        config = Config(decoder=name)
        syncs, steps = count_syncs(config, gpu_images[:128 * args.steps])
        gpu, cpu = (epoch_seconds(config, images) for images in (gpu_images, cpu_images))
        rows[name] = [f"{syncs / steps:.2f}", f"{gpu:.2f}", f"{cpu:.2f}"]
        print(f"{name}: {rows[name]}", flush=True)
        failed += [] if syncs == 0 else [f"{name}: synchronises inside a step"]
    with tempfile.TemporaryDirectory() as scratch:
        epochs, seconds = default_run(args.data_root, os.path.join(scratch, "default"), [])
        print(f"train.py (the default, 50 epochs) on CUDA: median epoch {statistics.median(seconds):.2f} s, "
              f"first {seconds[0]:.2f} s, last test loss {epochs[-1]:.2f}", flush=True)
        metrics_seconds, metrics_ok = sample_metrics(args.data_root, args.out or scratch, scratch)
        print(f"sample.py --metrics on CUDA: {'ran' if metrics_ok else 'FAILED'} in {metrics_seconds:.0f} s",
              flush=True)
        failed += [] if metrics_ok else ["sample.py --metrics failed on CUDA"]
        with ThreadPoolExecutor(args.workers) as pool:  # subprocesses: the threads only wait
            repeats = {name: pool.submit(deterministic_runs, args.data_root, flags, ["--deterministic"])
                       for name, flags in DECODERS.items()}
            plain = {name: pool.submit(deterministic_runs, args.data_root, flags, [], False)
                     for name, flags in DECODERS.items()}
            long_runs = [pool.submit(default_run, args.data_root, os.path.join(scratch, f"det{i}"),
                                     ["--deterministic"]) for i in range(2)]
            for name in DECODERS:
                (same, resumed), (plain_same, _) = repeats[name].result(), plain[name].result()
                rows[name] += [yes(same), yes(resumed), yes(plain_same)]
                failed += [f"{name}: {what}" for what, ok in [("--deterministic does not repeat", same),
                                                               ("--deterministic --resume does not continue", resumed)]
                           if not ok]
            for run in long_runs:
                run.result()
        first, second = (weights(os.path.join(scratch, f"det{i}"), 50) for i in range(2))
        long_repeat = all(torch.equal(first[k], second[k]) for k in first)
    header = ("decoder", "syncs/step", "GPU s/epoch", "CPU s/epoch", "repeats", "resume exact", "repeats w/o flag")
    print(" | ".join(header))
    for name, row in rows.items():
        print(" | ".join(f"{cell:>{len(title)}}" for cell, title in zip([name, *row], header)))
    print(f"the default 50-epoch run twice with --deterministic: {'bit for bit' if long_repeat else 'DIFFERENT'}")
    failed += [] if long_repeat else ["the default run with --deterministic does not repeat"]
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
    # warm-up, an epoch of the same size: the first call's handles, and the pinned host memory of the
    # epoch's copies (its first allocation of a size may wait, once; a run's later epochs reuse it)
    model.data_decoder.teacher_forcing = 0.5  # the recurrent decoder row by row, as on its schedule
    train_epoch(model, optimizer, images, config, 0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(model, optimizer, images, config, 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    if len(syncs) > END_OF_EPOCH_SYNCS:  # which call, for whoever looks into it
        print(f"{config.decoder}: {len(syncs)} synchronising calls, the first: {syncs[0].filename}:{syncs[0].lineno} "
              f"{str(syncs[0].message).splitlines()[0]}")
    return len(syncs) - END_OF_EPOCH_SYNCS, len(images) // 128


def epoch_seconds(config, images):
    torch.manual_seed(0)
    model = MixAndMatchCVAE(config).to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    train_epoch(model, optimizer, images[:1280], config, 0)  # warm-up
    t0 = time.time()
    train_epoch(model, optimizer, images, config, 0)  # its .item() waits for the GPU's last step
    return time.time() - t0


def train(data_root, folder, flags, epochs, *extra):
    """train.py on CUDA into folder/ck and folder/res; returns its stdout."""
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data-root", data_root, "--device",
                           "cuda", "--checkpoint-dir", os.path.join(folder, "ck"), "--results-dir",
                           os.path.join(folder, "res"), "--epochs", str(epochs), *flags, *extra],
                          check=True, capture_output=True, text=True).stdout


def weights(folder, epochs):
    return torch.load(os.path.join(folder, "ck", f"mix_match_{epochs:02d}.pth"), map_location="cpu",
                      weights_only=True)["model"]


def deterministic_runs(data_root, flags, determinism, resume=True):
    """(does a seeded 2-epoch run repeat bit for bit, does a run resumed after epoch 1 end there)."""
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("a", "b"):
            train(data_root, os.path.join(scratch, name), [*flags, *determinism], 2)
        first, second = (weights(os.path.join(scratch, name), 2) for name in ("a", "b"))
        repeats = all(torch.equal(first[k], second[k]) for k in first)
        if not resume:
            return repeats, None
        train(data_root, os.path.join(scratch, "c"), [*flags, *determinism], 1)
        train(data_root, os.path.join(scratch, "d"), determinism, 2, "--resume",
              os.path.join(scratch, "c", "ck", "mix_match_01.pth"))
        resumed = weights(os.path.join(scratch, "d"), 2)
        return repeats, all(torch.equal(first[k], resumed[k]) for k in first)


def default_run(data_root, folder, flags):
    """The default 50 epochs on CUDA: (test loss per epoch, seconds per epoch) as train.py prints them."""
    lines = EPOCH_LINE.findall(train(data_root, folder, flags, 50))
    return [float(loss) for loss, _ in lines], [float(seconds) for _, seconds in lines]


def sample_metrics(data_root, out, cache):
    """sample.py --metrics on CUDA from the shipped checkpoint: (seconds, ran), its grid and JSON in out/."""
    t0 = time.time()
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--data-root", data_root, "--device",
                             "cuda", "--checkpoint", os.path.join(REPO, "checkpoint", "mix_match_50.pth"),
                             "--metrics", "--out", os.path.join(out, "sampled_cuda.png"), "--cache-dir", cache,
                             "--json", os.path.join(out, "metrics_cuda.json")],
                            capture_output=True, text=True, check=False)
    seconds = time.time() - t0
    print(result.stdout[-3000:] if result.returncode == 0 else result.stderr[-2000:])
    return seconds, result.returncode == 0


if __name__ == "__main__":
    main()
