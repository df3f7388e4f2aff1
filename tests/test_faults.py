"""Faults and bad input, run as a user meets them, on synthetic MNIST: the scripts in this process
(conftest's in_process, which gives the exit code and output a subprocess would), and in a
subprocess where a real signal interrupts them. Each ends in one message that says what to do, a
non-zero exit code, no traceback, and leaves every file on disk whole (no NaN checkpoint, no .tmp,
earlier checkpoints byte for byte)."""
import errno
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import N_TRAIN, REPO
from model import MixAndMatchCVAE
from train import train_epoch
from utils import atomic_save, get_device, load_mnist, split_image


@pytest.fixture
def train(in_process, tmp_path, mnist_root):
    """train.py in tmp_path on the CPU, into ck/ and results/: train("--epochs", 1) -> its result."""
    def run(*extra, check=True):
        return in_process("train.py", "--data-root", mnist_root, "--device", "cpu", "--checkpoint-dir", "ck",
                          "--results-dir", "results", *extra, cwd=tmp_path, check=check)
    return run


def assert_refused(result, message, code=1):
    """One message, no traceback, the exit code; the message is the last thing on stderr."""
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def checkpoints_on_disk(folder):
    """Every file of a checkpoint folder: names and bytes; fails if one is not a whole checkpoint."""
    files = {os.path.basename(p): Path(p).read_bytes() for p in sorted(glob.glob(os.path.join(folder, "*")))}
    assert not [name for name in files if not name.endswith(".pth")], files.keys()  # no .tmp
    for name in files:
        checkpoint = torch.load(os.path.join(folder, name), weights_only=True)
        assert all(t.isfinite().all() for t in checkpoint["model"].values() if t.is_floating_point()), name
    return files


def test_a_diverging_run_stops_at_its_epoch_and_writes_no_nan_checkpoint(tmp_path, train):
    assert_refused(train("--lr", "1e6", check=False),
                   "training diverged in epoch 1")
    assert checkpoints_on_disk(tmp_path / "ck") == {}

    train("--epochs", "1")
    before = checkpoints_on_disk(tmp_path / "ck")
    result = train("--epochs", "5", "--resume", "ck/mix_match_01.pth", "--lr", "1e6", check=False)
    assert_refused(result, "training diverged in epoch 2")
    assert "The last good checkpoint is ck/mix_match_01.pth" in result.stderr
    assert "--resume ck/mix_match_01.pth --epochs 5" in result.stderr and "--lr 100000" in result.stderr
    assert checkpoints_on_disk(tmp_path / "ck") == before  # nothing new, nothing changed


def test_batch_norm_never_sees_a_batch_of_one(tmp_path, train):
    assert_refused(train("--batch-size", "1", check=False), "--batch-size must be at least 2", 2)
    result = train("--epochs", "1", "--batch-size", str(N_TRAIN - 1))
    assert "last batch of one image" in result.stdout and "skipped" in result.stdout
    assert torch.load(tmp_path / "ck" / "mix_match_01.pth", weights_only=True)["step"] == 1


def test_skipping_a_last_batch_of_one_leaves_every_other_batch_as_it_was(mnist_root):
    images = load_mnist(mnist_root, train=True, device="cpu")[0][:257]  # batches of 128, 128 and 1
    seen = []
    model = MixAndMatchCVAE()
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    torch.manual_seed(0)
    step = train_epoch(model, torch.optim.Adam(model.parameters()), images, 128, 64, 0)[2]
    torch.manual_seed(0)
    expected = [split_image(images[indices])[0] for indices in DataLoader(range(257), batch_size=128, shuffle=True)]
    assert step == 2 and len(seen) == 2 and [len(b) for b in expected] == [128, 128, 1]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected[:2]))


def test_output_folders_and_files_are_checked_before_any_work(tmp_path, in_process):
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    nowhere = tmp_path / "no_data"  # had training or sampling started, this would be the error
    for flag in ["--checkpoint-dir", "--results-dir"]:
        result = in_process("train.py", "--data-root", nowhere, flag, "a_file/sub", cwd=tmp_path)
        assert_refused(result, f"cannot write in the folder 'a_file/sub' (Not a directory); pass another {flag}")
    for args, message in [(["--out", "results/grid"], "--out 'results/grid': no extension to name its format"),
                          (["--out", "grid.xyz"], "--out 'grid.xyz': cannot write the format '.xyz'"),
                          (["--out", "a_file/grid.png"], "cannot write in the folder 'a_file'"),
                          (["--figure", "fig.bmp2"], "--figure 'fig.bmp2': cannot write the format '.bmp2'"),
                          (["--figure", "a_file/fig.png"], "cannot write in the folder 'a_file'")]:
        result = in_process("sample.py", "--data-root", nowhere, "--checkpoint", "missing.pth", *args, cwd=tmp_path)
        assert_refused(result, message)
    assert [name for _, _, files in os.walk(tmp_path) for name in files] == ["a_file"]  # nothing was written


@pytest.mark.parametrize("device, message", [("tpu", "--device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
                                             ("cuda:x", "--device 'cuda:x' is not one of"),
                                             ("meta", "--device 'meta' is not one of"),
                                             ("cuda:0", "asked for CUDA, which is not available here")])
def test_device_strings_get_one_line(device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    with pytest.raises(SystemExit, match=re.escape(message)):
        get_device(device)


def test_scripts_refuse_a_bad_device_before_any_work(tmp_path, in_process):
    for script in ["train.py", "sample.py"]:
        assert_refused(in_process(script, "--device", "cuda:x", cwd=tmp_path), "is not one of")


def test_resume_refuses_nothing_to_do_and_contradicting_model_flags(tmp_path, train):
    train("--epochs", "2")
    before = checkpoints_on_disk(tmp_path / "ck")
    result = train("--resume", "ck/mix_match_02.pth", "--epochs", "2", check=False)
    assert_refused(result, "ck/mix_match_02.pth is already at epoch 2, and --epochs is 2: nothing left to train")
    contradicting = [("--alpha", 10, 64), ("--hidden-dim", 64, 128), ("--latent-dim", 8, 32),
                     ("--conditioning", "fixed", "mix-and-match"), ("--curriculum-step", 2, 0)]
    result = train("--resume", "ck/mix_match_01.pth", "--epochs", "3",
                   *[word for flag, value, _ in contradicting for word in (flag, value)], check=False)
    assert_refused(result, "a resumed run keeps its checkpoint's model")
    for flag, value, saved in contradicting:  # each named, with the checkpoint's value
        assert f"{flag} {value} (the checkpoint has {saved})" in result.stderr
    assert checkpoints_on_disk(tmp_path / "ck") == before

    # what may change on resume does: --lr, --epochs, the folders; a model flag that agrees is accepted
    train("--resume", "ck/mix_match_01.pth", "--epochs", "2", "--lr", "3e-4",
          "--alpha", "64", "--checkpoint-dir", "ck2")
    resumed = torch.load(tmp_path / "ck2" / "mix_match_02.pth", weights_only=True)
    assert resumed["optimizer"]["param_groups"][0]["lr"] == 3e-4 and resumed["args"]["lr"] == 3e-4


def test_a_truncated_mnist_file_is_named_not_called_missing(tmp_path, mnist_root, in_process):
    root = tmp_path / "data"
    shutil.copytree(mnist_root, root)
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    torch.save(MixAndMatchCVAE().state_dict(), tmp_path / "tutorial.pth")  # sample.py reads a checkpoint first
    for script, extra in [("train.py", []), ("sample.py", ["--checkpoint", "tutorial.pth"])]:
        result = in_process(script, "--data-root", root, "--device", "cpu", *extra, cwd=tmp_path)
        assert_refused(result, f"the MNIST file {images} is there but unreadable (5000 bytes, its header says")
        assert "is not under" not in result.stderr


def start_training(tmp_path, mnist_root):
    """train.py in the background, returned once its first checkpoint is on disk."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--data-root", mnist_root, "--device",
                                "cpu", "--epochs", "1000", "--checkpoint-dir", "ck", "--results-dir", "results"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / "ck" / "*.pth")) and time.time() < deadline:
        time.sleep(0.02)
    return process


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("delay", [0.0, 0.3])  # in training, or in the middle of an epoch's writes
def test_interrupts_name_the_last_checkpoint_and_leave_every_file_whole(tmp_path, mnist_root, signum, code, delay):
    process = start_training(tmp_path, mnist_root)
    time.sleep(delay)
    process.send_signal(signum)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == code and "Traceback" not in stderr, stderr
    last = max(checkpoints_on_disk(tmp_path / "ck"))
    assert f"interrupted ({signal.Signals(signum).name}) in epoch" in stderr
    assert (f"The last complete checkpoint is ck/{last}; continue with: python3 train.py --resume ck/{last} "
            f"--epochs 1000 --data-root {mnist_root} --checkpoint-dir ck --device cpu") in stderr
    assert not glob.glob(str(tmp_path / "results" / "*.tmp"))


def failing_open(fail_when, after_bytes=1000):
    """open() whose files opened for writing at a path where fail_when(path) is true fail with
    ENOSPC after after_bytes, as a full disk does."""
    def fake_open(path, mode="r"):
        f = open(path, mode)  # noqa: SIM115 (returned open, as open() does)
        if "w" not in mode or not fail_when(path):
            return f
        write, written = f.write, [0]

        def write_until_full(data):
            written[0] += len(data)
            if written[0] > after_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(data)
        f.write = write_until_full
        return f
    return fake_open


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    # torch.save's zip writer meets the full disk part-way, as it would on a real one
    model = MixAndMatchCVAE()
    path = str(tmp_path / "mix_match_01.pth")
    atomic_save(model.state_dict(), path)
    before = Path(path).read_bytes()
    monkeypatch.setattr("utils.open", failing_open(lambda p: True), raising=False)
    with pytest.raises(OSError) as raised:
        atomic_save(MixAndMatchCVAE().state_dict(), path)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == path
    assert os.listdir(tmp_path) == ["mix_match_01.pth"] and Path(path).read_bytes() == before


def test_train_py_on_a_full_disk_names_the_last_checkpoint(tmp_path, train, monkeypatch):
    train("--epochs", "1")
    before = checkpoints_on_disk(tmp_path / "ck")
    # train.py as the user runs it, with its checkpoint writes failing from epoch 2 on
    monkeypatch.setattr("utils.open", failing_open(lambda p: "match_02" in p), raising=False)
    result = train("--epochs", "3", "--resume", "ck/mix_match_01.pth", check=False)
    assert_refused(result, "error: ck/mix_match_02.pth: the disk is full (No space left on device): free space. The "
                           "last complete checkpoint is ck/mix_match_01.pth; continue with: python3 train.py --resume "
                           "ck/mix_match_01.pth")
    assert checkpoints_on_disk(tmp_path / "ck") == before
