"""Training's own safeguards: a run that diverges stops at its epoch without a NaN checkpoint, and
BatchNorm never sees a batch of one image."""

import torch
from torch.utils.data import DataLoader

from conftest import N_TRAIN, checkpoints_on_disk, refused
from model import Config, MixAndMatchCVAE, split_image
from train import train_epoch
from utils import (
    load_mnist,
)


def test_a_diverging_run_stops_at_its_epoch_and_writes_no_nan_checkpoint(tmp_path, train):
    refused(train("--lr", "1e6", check=False),
                   "training diverged in epoch 1")
    assert checkpoints_on_disk(tmp_path / "ck") == {}

    train("--epochs", "1")
    before = checkpoints_on_disk(tmp_path / "ck")
    result = train("--epochs", "5", "--resume", "ck/mix_match_01.pth", "--lr", "1e6", check=False)
    refused(result, "training diverged in epoch 2")
    assert "The last good checkpoint is ck/mix_match_01.pth" in result.stderr
    assert "--resume ck/mix_match_01.pth --epochs 5" in result.stderr and "--lr 100000" in result.stderr
    assert checkpoints_on_disk(tmp_path / "ck") == before  # nothing new, nothing changed

def test_batch_norm_never_sees_a_batch_of_one(tmp_path, train):
    refused(train("--batch-size", "1", check=False), "--batch-size must be at least 2", code=2)
    result = train("--epochs", "1", "--batch-size", str(N_TRAIN - 1))
    assert "last batch of one image" in result.stdout and "skipped" in result.stdout
    assert torch.load(tmp_path / "ck" / "mix_match_01.pth", weights_only=True)["step"] == 1

def test_skipping_a_last_batch_of_one_leaves_every_other_batch_as_it_was(mnist_root):
    images = load_mnist(mnist_root, train=True, device="cpu")[0][:257]  # batches of 128, 128 and 1
    seen = []
    model = MixAndMatchCVAE()
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    torch.manual_seed(0)
    step = train_epoch(model, torch.optim.Adam(model.parameters()), images, Config(), 0)[2]
    torch.manual_seed(0)
    expected = [split_image(images[indices])[0] for indices in DataLoader(range(257), batch_size=128, shuffle=True)]
    assert step == 2 and len(seen) == 2 and [len(b) for b in expected] == [128, 128, 1]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected[:2]))
