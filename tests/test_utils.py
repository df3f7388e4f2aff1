import argparse
import errno
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

import utils
from model import BinaryCrossEntropySum, Config, MixAndMatchCVAE, join_image, kl_divergence, split_image
from train import kl_anneal_function
from utils import (
    atomic_write,
    explain_os_error,
    given,
    load_checkpoint,
    positive_float,
    positive_int,
    save_checkpoint,
    shell_command,
    write_all,
)


def test_logistic_annealing_values():
    # 1 / (1 + exp(-k (step - x0))) with the tutorial's k = 0.002, x0 = 2500
    assert kl_anneal_function("logistic", 2500, 0.002, 2500) == 0.5
    assert math.isclose(kl_anneal_function("logistic", 0, 0.002, 2500), 1 / (1 + math.exp(5)))
    assert math.isclose(kl_anneal_function("logistic", 5000, 0.002, 2500), 1 / (1 + math.exp(-5)))
    weights = [kl_anneal_function("logistic", s, 0.002, 2500) for s in range(0, 20000, 500)]
    assert weights == sorted(weights) and weights[-1] > 0.9999


def test_linear_annealing_values():
    assert kl_anneal_function("linear", 0, 0.002, 2500) == 0
    assert kl_anneal_function("linear", 1250, 0.002, 2500) == 0.5
    assert kl_anneal_function("linear", 9000, 0.002, 2500) == 1
    with pytest.raises(ValueError, match="logistic"):
        kl_anneal_function("cosine", 0, 0.002, 2500)


def test_kl_divergence_matches_torch_distributions():
    mu, logvar = torch.randn(8, 32), torch.randn(8, 32)
    expected = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)  # per image
    assert torch.allclose(kl_divergence(mu, logvar), expected, rtol=1e-5)


def test_fast_bce_is_torch_bce_with_torch_gradients():
    # large logits saturate the sigmoid to exactly 0 and 1, where both clamp log at -100
    logits = (30 * torch.randn(64, 500)).requires_grad_()
    target = torch.rand(64, 500)
    target[target < 0.3], target[target > 0.7] = 0, 1  # MNIST has both exact 0 and exact 1 pixels
    probabilities = torch.sigmoid(logits)
    assert (probabilities == 0).any() and (probabilities == 1).any()
    losses, gradients = [], []
    for bce in [BinaryCrossEntropySum.apply, lambda p, t: F.binary_cross_entropy(p, t, reduction="sum")]:
        loss = bce(torch.sigmoid(logits), target)
        losses.append(loss)
        gradients.append(torch.autograd.grad(loss, logits)[0])
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    assert torch.equal(gradients[0], gradients[1])  # so training is bit-identical


def test_split_and_join_are_inverse_at_pixel_500():
    images = torch.rand(3, 784)
    data, condition = split_image(images)
    assert data.shape == (3, 500) and condition.shape == (3, 284)
    assert torch.equal(condition[:, 0], images[:, 500])
    assert torch.equal(join_image(data, condition), images)


def test_flag_types_refuse_bad_values():
    assert positive_int("3") == 3 and positive_float("1e-4") == 1e-4
    for bad in ["0", "-2", "1.5", "x"]:
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
    for bad in ["0", "-1e-4", "nan", "inf", "x"]:
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(bad)


def test_checkpoint_round_trip_and_tutorial_state_dict(tmp_path):
    model = MixAndMatchCVAE(Config(hidden_dim=64, latent_dim=8))
    optimizer = torch.optim.Adam(model.parameters())
    path = str(tmp_path / "sub" / "mix_match_03.pth")
    config = Config(hidden_dim=64, latent_dim=8, alpha=20, lr=3e-4)
    save_checkpoint(path, model, optimizer, config, epoch=3, step=99, history=[])
    loaded, checkpoint = load_checkpoint(path, torch.device("cpu"), resume=True)
    assert loaded.config == config  # the run's settings whole, the recipe's too
    assert (checkpoint["epoch"], checkpoint["step"]) == (3, 99)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not list(tmp_path.glob("sub/*.tmp"))

    torch.save(MixAndMatchCVAE().state_dict(), tmp_path / "tutorial.pth")  # a bare state_dict
    loaded, checkpoint = load_checkpoint(str(tmp_path / "tutorial.pth"), torch.device("cpu"))
    assert loaded.config == Config() and checkpoint["config"]["alpha"] == 64


def test_checkpoint_errors_are_one_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pth"), torch.device("cpu"))
    torch.save(MixAndMatchCVAE().state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match="truncated"):
        load_checkpoint(str(tmp_path / "cut.pth"), torch.device("cpu"))
    torch.save(MixAndMatchCVAE(Config(hidden_dim=64)).state_dict(), tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="does not match"):
        load_checkpoint(str(tmp_path / "other.pth"), torch.device("cpu"))


# ----------------------------------------------------------------------------- Windows, its system calls replaced

@pytest.fixture
def windows(monkeypatch):
    """utils as on Windows."""
    monkeypatch.setattr(utils, "WINDOWS", True)


def test_on_windows_a_file_held_open_is_retried_then_named(tmp_path, windows, monkeypatch):
    path, tries = tmp_path / "curves.png", []
    path.write_bytes(b"old")

    def held(tmp, target):  # what Windows does while an image viewer has the file open
        tries.append(target)
        raise PermissionError(errno.EACCES, "Access is denied", target)
    monkeypatch.setattr(os, "replace", held)
    monkeypatch.setattr(utils.time, "sleep", lambda s: None)
    with pytest.raises(PermissionError) as e:
        atomic_write(str(path), lambda f: f.write(b"new"))
    assert len(tries) == 20 and e.value.filename == str(path)
    assert explain_os_error(e.value) == (f"{path}: another program holds it open, so it cannot be replaced: close it "
                                         f"(an image viewer, an editor)")  # not a full disk
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["curves.png"]  # no .tmp left

    replaced = iter([PermissionError(errno.EACCES, "Access is denied"), None])  # closed after the first try

    def closed_soon(tmp, target):
        error = next(replaced)
        if error:
            raise error
        os.rename(tmp, target)
    monkeypatch.setattr(os, "replace", closed_soon)
    atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"


def test_a_permission_error_elsewhere_is_not_retried(tmp_path, monkeypatch):
    tries = []

    def refused(tmp, target):
        tries.append(target)
        raise PermissionError(errno.EACCES, "Permission denied", target)
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        atomic_write(str(tmp_path / "x.json"), lambda f: f.write(b"{}"))
    assert len(tries) == 1


def test_a_command_to_paste_is_quoted_for_the_shell_of_the_system(monkeypatch):
    words = ["python3", "train.py", "--resume", "C:\\my runs\\mix_match_03.pth"]
    assert shell_command(words) == "python3 train.py --resume 'C:\\my runs\\mix_match_03.pth'"
    monkeypatch.setattr(utils, "WINDOWS", True)  # cmd.exe keeps single quotes: double ones there
    assert shell_command(words) == 'python3 train.py --resume "C:\\my runs\\mix_match_03.pth"'


@pytest.mark.parametrize("code, cause", [
    (errno.ENOSPC, "the disk is full (No space left on device): free space"),
    (errno.EDQUOT, "the disk is full (Disk quota exceeded): free space"),
    (errno.EACCES, "cannot be written there (Permission denied): make it writable, or pass another path"),
    (errno.EROFS, "cannot be written there (Read-only file system): make it writable, or pass another path"),
    (errno.EISDIR, "a folder stands where a file belongs, or a file where a folder belongs (Is a directory): move "
                   "it aside, or pass another path"),
    (errno.ENOTDIR, "a folder stands where a file belongs, or a file where a folder belongs (Not a directory): move "
                    "it aside, or pass another path"),
    (errno.EIO, "Input/output error")])  # any other: the system's own words
def test_an_os_error_is_explained_by_its_cause(code, cause):
    assert explain_os_error(OSError(code, os.strerror(code), "results/curves.png")) == f"results/curves.png: {cause}"


def test_several_files_are_written_all_or_nothing(tmp_path, monkeypatch):
    a, b, folder = tmp_path / "a.md", tmp_path / "b.md", tmp_path / "c.md"
    a.write_text("old a", encoding="utf-8")
    folder.mkdir()  # a folder where the third file belongs: found before any file is replaced
    with pytest.raises(IsADirectoryError) as e:
        write_all({str(a): lambda f: f.write(b"new a"), str(b): lambda f: f.write(b"new b"),
                   str(folder): lambda f: f.write(b"new c")})
    assert e.value.filename == str(folder) and a.read_text(encoding="utf-8") == "old a" and not b.exists()
    assert sorted(os.listdir(tmp_path)) == ["a.md", "c.md"]  # no .tmp left

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError) as e:  # the disk full at the second: the first stays as it was
        write_all({str(a): lambda f: f.write(b"new a"), str(b): full})
    assert e.value.filename == str(b) and a.read_text(encoding="utf-8") == "old a"
    write_all({str(a): lambda f: f.write(b"new a"), str(b): lambda f: f.write(b"new b")})
    assert (a.read_text(encoding="utf-8"), b.read_text(encoding="utf-8")) == ("new a", "new b")


def test_an_empty_name_or_path_is_refused():
    assert given("runs") == "runs"
    with pytest.raises(argparse.ArgumentTypeError, match="got an empty string"):
        given("")
