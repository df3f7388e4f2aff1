"""Our fast training loop trains exactly what the tutorial's pipeline trains (tests/bench_train.py
times the two): same batches, same Sampling draws, same losses and weights for a seed."""
import pytest
import torch

from bench_train import TutorialModel, tutorial_epoch, tutorial_loader
from model import Config, MixAndMatchCVAE
from train import train_epoch
from utils import load_mnist


def test_train_epoch_matches_the_tutorial_pipeline(mnist_root):
    images, _ = load_mnist(mnist_root, train=True, device="cpu")
    results = {}
    for name in ["ours", "tutorial"]:
        torch.manual_seed(0)
        model = MixAndMatchCVAE() if name == "ours" else TutorialModel()
        # default Adam in both: fused Adam differs only by rounding (README, Speed)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name == "ours":
            losses = [train_epoch(model, optimizer, images, Config(), step) for step in (0, 3)]
        else:
            loader = tutorial_loader(mnist_root, 128)
            losses = [tutorial_epoch(model, optimizer, loader, 64, step, torch.device("cpu")) for step in (0, 3)]
        results[name] = losses, model.state_dict(), torch.rand(1)  # the last: where the RNG stream is
    (ours, ours_weights, ours_next), (tutorial, tutorial_weights, tutorial_next) = results["ours"], results["tutorial"]
    for (rec, kl, step), (rec_t, kl_t, step_t) in zip(ours, tutorial):
        assert step == step_t and abs(rec - rec_t) < 1e-4 * rec_t and abs(kl - kl_t) < 1e-4 * kl_t
    assert torch.equal(ours_next, tutorial_next)
    for key, value in ours_weights.items():
        assert torch.allclose(value.float(), tutorial_weights[key].float(), atol=1e-6), key


@pytest.mark.parametrize("script, flags, message", [
    ("tests/bench_train.py", ["--epochs", "0"], "argument --epochs: expected a whole number >= 1, got '0'"),
    ("tests/bench_train.py", ["--run-epochs", "-1"], "argument --run-epochs: expected a whole number >= 1"),
    ("tests/bench_train.py", ["--data-root", ""], "argument --data-root: expected a name or a path, got an empty"),
    ("tests/gpu_check.py", ["--steps", "0"], "argument --steps: expected a whole number >= 1, got '0'"),
])
def test_the_benchmarks_refuse_a_count_below_one_before_any_work(in_process, tmp_path, script, flags, message):
    result = in_process(script, *flags, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
