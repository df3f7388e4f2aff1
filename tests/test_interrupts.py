"""Interrupts, full disks and runs at once: Ctrl-C and SIGTERM in training and in each step of
sample.py, a full disk during every kind of output, two trainings into one folder, two writers of
one file, locks left by a run that was killed, a checkout the user cannot write. Each ends in one
message, the exit code a shell expects, and every file on disk whole."""
import errno
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from conftest import METRICS, REPO, checkpoints_on_disk, read_only, refused
from model import MixAndMatchCVAE
from utils import (
    atomic_save,
    atomic_write,
    newest_checkpoint,
)


@pytest.mark.parametrize("output, flags", [
    ("g.png", []), ("fig.png", ["--figure", "fig.png"]), ("m.json", [*METRICS, "--json", "m.json"]),
    ("digit_classifier.pth", METRICS), ("mnist_neighbours.pth", METRICS)])
def test_sample_py_on_a_full_disk_writes_no_half_file(user, trained, tmp_path, monkeypatch, output, flags):
    monkeypatch.setattr("utils.open", failing_open(lambda p: p.endswith(output + ".tmp"), after_bytes=10),
                        raising=False)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", *flags),
            f"{output}: the disk is full (No space left on device): free space, then run the command again; the "
            f"files written before it are whole.")
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert not [p for p in written if p.endswith((".tmp", output))], written

@pytest.mark.parametrize("output, epochs, message", [
    ("args.json", 2, "No checkpoint of this run is on disk yet; start it again."),
    ("rec_01.png", 2, "No checkpoint of this run is on disk yet; start it again."),
    ("history.json", 2, "The last complete checkpoint is ck/mix_match_01.pth; continue with"),
    # after the last epoch: its checkpoint is whole, and --resume would have nothing left to train
    ("curves.png", 1, ("Training is complete: ck/mix_match_01.pth holds the last epoch, whole; only "
                      "res/curves.png is missing.")),
])
def test_train_py_on_a_full_disk_during_each_output(user, tmp_path, monkeypatch, output, epochs, message):
    monkeypatch.setattr("utils.open", failing_open(lambda p: p.endswith(output + ".tmp"), after_bytes=10),
                        raising=False)
    refused(user("train.py", "--epochs", epochs, "--checkpoint-dir", "ck", "--results-dir", "res"),
            f"error: res/{output}: the disk is full (No space left on device): free space. {message}")
    assert not list(tmp_path.glob("*/*.tmp"))

@pytest.mark.parametrize("step", ["random_shift", "bottom_neighbours", "posterior_draws", "plot_sampling_resampling"])
def test_ctrl_c_in_each_step_of_sample_py_leaves_every_file_whole(user, trained, tmp_path, monkeypatch, step):
    # the classifier's training, the neighbours' search, the metrics, the figure
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(f"utils.{step}", interrupted)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, "--json", "m.json",
                 "--figure", "fig.png"), "interrupted: the files written so far are whole", code=130)
    for cache in (tmp_path / "checkpoint").glob("*"):
        torch.load(cache, weights_only=True)  # whole, if written at all
    assert not (tmp_path / "m.json").exists() and not list(tmp_path.glob("**/*.tmp"))
    assert (tmp_path / "g.png").is_file()  # the grid came first, whole

def test_a_second_train_py_into_the_same_folder_is_refused_and_a_killed_ones_lock_taken_over(user, tmp_path):
    (tmp_path / "ck").mkdir()
    lock = str(tmp_path / "ck" / "train.lock")
    with FileLock(lock, timeout=0):  # a live train.py holds the folder (this process stands in for it)
        refused(user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res"),
                "another train.py is writing checkpoints in 'ck'; wait for it to end, or pass another --checkpoint-dir")
    assert os.listdir(tmp_path / "ck") == ["train.lock"]
    # valid: a run killed while it held the lock (SIGKILL: no handler runs) leaves its file, not its lock
    holder = subprocess.Popen([sys.executable, "-c", f"import filelock, time; filelock.FileLock({lock!r}).acquire(); "
                               "print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    holder.kill()
    holder.wait()
    user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res", check=True)
    assert sorted(os.listdir(tmp_path / "ck")) == ["mix_match_01.pth", "train.lock"]

def test_sample_py_takes_the_newest_whole_checkpoint_while_a_training_writes_the_next(user, trained, tmp_path):
    # valid: train.py is writing epoch 2; its half-written file has a name the checkpoint glob does not match
    (tmp_path / "ck" / "0badc0de.mix_match_02.pth.tmp").write_bytes(b"PK\x03\x04 half a zip")
    assert newest_checkpoint(str(tmp_path / "ck")) == str(trained)

def test_two_writers_of_one_file_each_leave_it_whole():
    # valid: two sample.py --metrics building one cache, or writing one --out, at the same time
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"two_writers_{os.getpid()}.pth")
    try:
        def first(f):
            f.write(b"first, ")
            atomic_write(path, lambda g: g.write(b"second"))  # the other process, in the middle of the first
            f.write(b"whole")
        atomic_write(path, first)
        with open(path, "rb") as f:
            assert f.read() == b"first, whole"
        assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith(f"two_writers_{os.getpid()}"
                                                                                          ".pth.tmp")]
    finally:
        os.remove(path)

def test_a_read_only_checkout_samples_and_measures_with_writable_paths(user, trained, tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "out").mkdir()
    with read_only(tmp_path / "checkpoint"):
        # the caches must be built, and checkpoint/ cannot hold them: one line that names the flag
        refused(user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS),
                "cannot write in the folder 'checkpoint' (Operation not permitted); pass another --cache-dir")
        user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS, "--cache-dir", "out/cache",
             "--json", "out/m.json", check=True)
    assert sorted(os.listdir(tmp_path / "out" / "cache")) == ["digit_classifier.pth", "mnist_neighbours.pth"]
    for name in os.listdir(tmp_path / "out" / "cache"):  # valid: a shared install whose caches are built
        os.rename(tmp_path / "out" / "cache" / name, tmp_path / "checkpoint" / name)
    with read_only(tmp_path / "checkpoint"):
        _, out, _ = user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS, check=True)
    assert "training the digit classifier" not in out
    refused(user("sample.py", "--checkpoint", trained, "--out", "out/g.png", *METRICS, "--cache-dir", "out/g.png"),
            "cannot write in the folder 'out/g.png'")

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
    refused(result, "error: ck/mix_match_02.pth: the disk is full (No space left on device): free space. The "
                           "last complete checkpoint is ck/mix_match_01.pth; continue with: python3 train.py --resume "
                           "ck/mix_match_01.pth")
    assert checkpoints_on_disk(tmp_path / "ck") == before
