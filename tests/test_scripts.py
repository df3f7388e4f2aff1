"""End to end: train.py then sample.py on tiny synthetic MNIST, as a user runs them: in a fresh
process where that is the point (the first run, one seeded run), in this process otherwise
(conftest's in_process: the same exit code and output, without a torch import per run)."""
import re

import torch
from PIL import Image

import utils
from conftest import EPOCH_LINE, run_script
from model import MixAndMatchCVAE


def train(tmp_path, mnist_root, name, *extra, run=run_script):
    """train.py into tmp_path/name, in a subprocess unless `run` is in_process; returns the folder
    and the epoch lines printed."""
    out = tmp_path / name
    result = run("train.py", "--data-root", mnist_root, "--checkpoint-dir", out / "checkpoint",
                 "--results-dir", out / "results", "--device", "cpu", *extra, cwd=tmp_path, check=True)
    return out, EPOCH_LINE.findall(result.stdout)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_train_one_epoch_then_sample(tmp_path, mnist_root):
    out, lines = train(tmp_path, mnist_root, "run", "--epochs", "1")
    assert len(lines) == 1 and lines[0][0] == "1"
    assert Image.open(out / "results" / "rec_01.png").size == (302, 302)  # 10 x 10 images of 28 px, 2 px padding
    checkpoint = torch.load(out / "checkpoint" / "mix_match_01.pth", weights_only=True)
    # 300 images: 3 batches
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["config"]["alpha"]) == (1, 3, 64)

    (tmp_path / "checkpoint").mkdir()  # sample.py's default: the newest checkpoint/mix_match_*.pth
    (out / "checkpoint" / "mix_match_01.pth").rename(tmp_path / "checkpoint" / "mix_match_01.pth")
    result = run_script("sample.py", "--data-root", mnist_root, "--device", "cpu",
                        "--figure", "fig/sampling_resampling.png", cwd=tmp_path)
    assert "20 rows x 20 columns" in result.stdout
    assert Image.open(tmp_path / "results" / "sampled.png").size == (602, 602)  # 20 x 20 images
    assert Image.open(tmp_path / "fig" / "sampling_resampling.png").size[0] > 1000


def test_seeded_runs_are_identical_and_seeds_matter(tmp_path, mnist_root, in_process):
    # a in a fresh process, b in one that has run other tests: the seed alone fixes a run
    a_dir, a = train(tmp_path, mnist_root, "a", "--epochs", "1", "--seed", "5")
    b_dir, b = train(tmp_path, mnist_root, "b", "--epochs", "1", "--seed", "5", run=in_process)
    _, c = train(tmp_path, mnist_root, "c", "--epochs", "1", "--seed", "6", run=in_process)
    assert a == b and a != c
    wa, wb = weights(a_dir / "checkpoint" / "mix_match_01.pth"), weights(b_dir / "checkpoint" / "mix_match_01.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_exactly(tmp_path, mnist_root, in_process):
    straight_dir, straight = train(tmp_path, mnist_root, "straight", "--epochs", "2", run=in_process)
    first_dir, _ = train(tmp_path, mnist_root, "first", "--epochs", "1", run=in_process)
    _, resumed = train(tmp_path, mnist_root, "first", "--epochs", "2",
                       "--resume", first_dir / "checkpoint" / "mix_match_01.pth", run=in_process)
    assert resumed == straight[1:]  # epoch 2 prints the same losses, KL weight included
    end = torch.load(first_dir / "checkpoint" / "mix_match_02.pth", weights_only=True)
    assert end["step"] == 6
    expected = weights(straight_dir / "checkpoint" / "mix_match_02.pth")
    assert all(torch.equal(end["model"][k], expected[k]) for k in expected)


def test_user_errors_are_one_clear_message(tmp_path, mnist_root, in_process):
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    result = in_process("sample.py", "--data-root", mnist_root, "--checkpoint", "cut.pth", cwd=tmp_path)
    assert result.returncode != 0 and "truncated" in result.stderr and "Traceback" not in result.stderr

    result = in_process("sample.py", "--data-root", mnist_root, cwd=tmp_path)  # no checkpoint/
    assert result.returncode != 0 and "train one" in result.stderr and "Traceback" not in result.stderr

    result = in_process("train.py", "--data-root", tmp_path / "nowhere", cwd=tmp_path)
    assert result.returncode != 0 and "MNIST/raw" in result.stderr and "Traceback" not in result.stderr

    torch.save(MixAndMatchCVAE().state_dict(), tmp_path / "tutorial.pth")  # weights only: cannot resume
    result = in_process("train.py", "--data-root", mnist_root, "--resume", "tutorial.pth", cwd=tmp_path)
    assert result.returncode != 0 and "weights only" in result.stderr and "Traceback" not in result.stderr

    result = in_process("train.py", "--alpha", "200", cwd=tmp_path)
    assert result.returncode == 2 and "--alpha must be in 0..128" in result.stderr
    result = in_process("train.py", "--epochs", "0", cwd=tmp_path)
    assert result.returncode == 2 and "a whole number >= 1" in result.stderr


def test_curves_are_drawn_after_the_last_epoch_not_after_each(tmp_path, mnist_root, in_process, monkeypatch):
    # three short epochs, well within train.CURVES_EVERY_S: one drawing, with every epoch in it
    monkeypatch.setattr(utils, "plot_history", lambda runs, path: print("drawn", *(len(h) for h in runs.values())))
    result = in_process("train.py", "--data-root", mnist_root, "--epochs", "3", "--device", "cpu", cwd=tmp_path,
                        check=True)
    assert re.findall(r"^drawn \d+$", result.stdout, re.MULTILINE) == ["drawn 3"]
