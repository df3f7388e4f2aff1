"""Conditioning modes, the curriculum, and the evaluation metrics of sample.py --metrics."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import N_TEST, N_TRAIN, run_script, write_idx
from model import MixAndMatchCVAE, ModelConfig
from train import curriculum_stage
from utils import (
    active_units,
    classifier_scores,
    completion_distances,
    importance_weighted_nll,
    load_or_train_classifier,
    posterior_draws,
    split_image,
)


def test_fixed_conditioning_always_takes_the_first_alpha_indices():
    model = MixAndMatchCVAE(ModelConfig(conditioning="fixed"))
    for _ in range(3):
        sampled, complementary = model.sampling(64)
        assert sampled.tolist() == list(range(64)) and sorted(complementary.tolist()) == list(range(64, 128))
    assert torch.equal(model.sampling(64, curriculum_stage=5)[0], torch.arange(64))  # no curriculum either


def test_unknown_conditioning_is_refused():
    with pytest.raises(ValueError, match="conditioning must be one of"):
        MixAndMatchCVAE(ModelConfig(conditioning="concat"))


@pytest.mark.parametrize("stage", [0, 1, 10, 31])
def test_curriculum_sets_keep_alpha_minus_s_known_indices(stage):
    model = MixAndMatchCVAE()
    draws = [set(model.sampling(64, curriculum_stage=stage)[0].tolist()) for _ in range(4)]
    for sampled in draws:
        assert len(sampled) == 64
        assert {i for i in sampled if i < 64} == set(range(64 - stage))  # the known part's first alpha - s
        assert len({i for i in sampled if i >= 64}) == stage  # s drawn from the rest
    assert stage == 0 or len({frozenset(s) for s in draws}) > 1


def test_curriculum_schedule():
    # alpha 64 of 128: stages 0..31 (th = 32), then full random Sampling (None)
    assert [curriculum_stage(e, 1, 64, 128) for e in (1, 2, 32, 33, 50)] == [0, 1, 31, None, None]
    assert [curriculum_stage(e, 3, 64, 128) for e in (1, 3, 4, 96, 97)] == [0, 0, 1, 31, None]
    assert curriculum_stage(1, 0, 64, 128) is None  # off: the tutorial
    assert [curriculum_stage(e, 1, 100, 128) for e in (14, 15)] == [13, None]  # th = (128 - 100) / 2


def test_diversity_and_errors_on_hand_made_completions():
    # three completions at distances 3, 4, 5 from each other (a 3-4-5 triangle), truth at the first
    completions = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]])
    diversity, best, mean = completion_distances(completions, torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(diversity, torch.tensor([4.0]))  # (3 + 4 + 5) * 2 / (3 * 2)
    assert torch.allclose(best, torch.tensor([0.0])) and torch.allclose(mean, torch.tensor([7 / 3]))


def test_conditional_inception_score():
    same = torch.log_softmax(torch.randn(1, 10), dim=1).expand(5, 4, 10)  # every sample alike
    assert torch.allclose(classifier_scores(same)[3], torch.ones(5))
    certain = torch.full((1, 2, 10), -1e4)  # two samples, certain of two different digits
    certain[0, 0, 3] = certain[0, 1, 7] = 0
    confidence, share, distinct, inception = classifier_scores(certain)
    assert torch.allclose(inception, torch.tensor([2.0])) and distinct.item() == 2
    assert confidence.item() == 1 and share.item() == 1


def test_importance_weighted_nll_is_tighter_than_the_elbo():
    torch.manual_seed(0)
    model = MixAndMatchCVAE(ModelConfig(hidden_dim=16, latent_dim=4)).eval()
    data, condition = split_image(torch.rand(64, 784))
    log_w, bce, kl, _ = posterior_draws(model, data, condition, alpha=8, n_importance=50)
    negative_elbo = (bce + kl).mean()
    assert importance_weighted_nll(log_w).mean() <= negative_elbo
    # with S = 1 the estimate is the ELBO's Monte Carlo form, equal to it in expectation
    single = torch.stack([importance_weighted_nll(log_w[s:s + 1]) for s in range(50)])
    assert math.isclose(single.mean().item(), negative_elbo.item(), rel_tol=1e-3)


def test_active_units_counts_units_whose_mean_moves_with_the_data():
    means = torch.zeros(3, 100, 4)
    means[:, :, 1] = torch.linspace(-1, 1, 100)  # varies over the data: active
    means[:, :, 2] = torch.randn(3, 1).expand(3, 100)  # varies only between draws: averaged away
    assert active_units(means) == 1


def test_metrics_command_end_to_end(tmp_path, mnist_root):
    run_script("train.py", "--data-root", mnist_root, "--epochs", "1", "--conditioning", "fixed",
               "--checkpoint-dir", "checkpoint", "--results-dir", "results", "--device", "cpu", cwd=tmp_path)
    args = ["--data-root", mnist_root, "--metrics", "--n-eval", 40, "--n-samples", 5, "--n-importance", 8,
            "--device", "cpu"]
    first = run_script("sample.py", *args, cwd=tmp_path)
    assert "training the digit classifier" in first.stdout and "fixed conditioning" in first.stdout
    assert (tmp_path / "checkpoint" / "digit_classifier.pth").is_file()
    second = run_script("sample.py", *args, cwd=tmp_path)  # cached classifier: the same table
    table = first.stdout.split("fixed conditioning")[1]
    assert "training" not in second.stdout and table == second.stdout.split("fixed conditioning")[1]
    for name in ["IW NLL", "diversity", "best-of-K", "active latent units", "conditional Inception Score"]:
        assert name in table
    history = (tmp_path / "results" / "history.json").read_text()
    assert '"train_kl"' in history and (tmp_path / "results" / "curves.png").is_file()


def test_a_classifier_cached_from_other_mnist_files_is_retrained(tmp_path, mnist_root, capsys):
    other_root = tmp_path / "other"
    (other_root / "MNIST" / "raw").mkdir(parents=True)
    rng = np.random.default_rng(1)  # other images than mnist_root's
    write_idx(other_root / "MNIST" / "raw", "train", N_TRAIN, rng)
    write_idx(other_root / "MNIST" / "raw", "t10k", N_TEST, rng)
    path = str(tmp_path / "classifier.pth")
    for root, expected in [(mnist_root, "training the digit classifier once"), (mnist_root, None),
                           (str(other_root), "was trained on other MNIST files")]:
        load_or_train_classifier(path, root, torch.device("cpu"), epochs=1)
        printed = capsys.readouterr().out
        assert (expected in printed) if expected else printed == ""


def test_metrics_json_holds_the_printed_numbers(tmp_path, mnist_root):
    run_script("train.py", "--data-root", mnist_root, "--epochs", "1", "--checkpoint-dir", "checkpoint",
               "--results-dir", "results", "--device", "cpu", cwd=tmp_path)
    result = run_script("sample.py", "--data-root", mnist_root, "--metrics", "--n-eval", 40, "--n-samples", 5,
                        "--n-importance", 8, "--device", "cpu", "--temperature", 1.5, "--seed", 3,
                        "--json", "out/metrics.json", cwd=tmp_path)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["temperature"] == 1.5 and "temperature 1.5;" in result.stdout
    assert (written["seed"], written["alpha"], written["train_alpha"], written["train_seed"]) == (3, 64, 64, 0)
    assert written["checkpoint"].endswith("mix_match_01.pth")
    assert f"test accuracy {100 * written['classifier_accuracy']:.2f}%" in result.stdout
    printed = result.stdout.splitlines()
    assert len(written["metrics"]) == 12
    for row in written["metrics"].values():  # each printed line, rebuilt from the JSON
        value = f"{row['model']:9d}" if isinstance(row["model"], int) else f"{row['model']:9.3f}"
        reference = "" if row["real_top"] is None else f"{row['real_top']:9.3f}"
        assert f"{row['name']:<48} {value} {reference:>9}" in printed


def test_sampling_flags_are_checked_before_any_work(tmp_path):
    for flags, message in [(["--temperature", "0"], "expected a finite number > 0, got '0'"),
                           (["--temperature", "-0.5"], "expected a finite number > 0, got '-0.5'"),
                           (["--json", "m.json"], "--json writes the metrics: add --metrics"),
                           (["--metrics", "--json", "m.txt"], "--json 'm.txt': cannot write the format '.txt'")]:
        result = run_script("sample.py", *flags, cwd=tmp_path, check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
