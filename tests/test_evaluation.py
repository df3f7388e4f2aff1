"""Conditioning modes, the curriculum, and the evaluation metrics of sample.py --metrics."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import N_TEST, N_TRAIN, run_script, write_idx
from model import Config, MixAndMatchCVAE, curriculum_stage, split_image
from utils import (
    active_units,
    bottom_neighbours,
    classifier_features,
    classifier_outputs,
    classifier_scores,
    completion_distances,
    digit_classifier,
    frechet_distance,
    gaussian_frechet_distance,
    importance_weighted_nll,
    load_mnist,
    load_or_find_neighbours,
    load_or_train_classifier,
    manifold_measures,
    multimodal_distances,
    posterior_draws,
)


def test_fixed_conditioning_always_takes_the_first_alpha_indices():
    model = MixAndMatchCVAE(Config(conditioning="fixed"))
    for _ in range(3):
        sampled, complementary = model.sampling(64)
        assert sampled.tolist() == list(range(64)) and sorted(complementary.tolist()) == list(range(64, 128))
    model.curriculum_stage = 5  # in training, at a stage of the curriculum: no curriculum either
    assert torch.equal(model.sampling(64)[0], torch.arange(64))


def test_unknown_conditioning_or_decoder_is_refused():
    with pytest.raises(ValueError, match="conditioning must be one of"):
        MixAndMatchCVAE(Config(conditioning="concatenate"))
    with pytest.raises(ValueError, match="decoder must be one of"):
        MixAndMatchCVAE(Config(decoder="rnn"))


@pytest.mark.parametrize("stage", [0, 1, 10, 31])
def test_curriculum_sets_keep_alpha_minus_s_known_indices(stage):
    model = MixAndMatchCVAE()
    model.curriculum_stage = stage  # as train.py sets it each epoch
    draws = [set(model.sampling(64)[0].tolist()) for _ in range(4)]
    for sampled in draws:
        assert len(sampled) == 64
        assert {i for i in sampled if i < 64} == set(range(64 - stage))  # the known part's first alpha - s
        assert len({i for i in sampled if i >= 64}) == stage  # s drawn from the rest
    assert stage == 0 or len({frozenset(s) for s in draws}) > 1
    assert model.eval().sampling(64)[0].tolist() != list(range(64))  # at test time, the tutorial's Sampling


def test_curriculum_schedule():
    # alpha 64 of 128: stages 0..31 (th = 32), then full random Sampling (None)
    def stages(step, alpha, epochs):
        return [curriculum_stage(e, Config(curriculum_step=step, alpha=alpha)) for e in epochs]
    assert stages(1, 64, (1, 2, 32, 33, 50)) == [0, 1, 31, None, None]
    assert stages(3, 64, (1, 3, 4, 96, 97)) == [0, 0, 1, 31, None]
    assert stages(0, 64, (1,)) == [None]  # off: the tutorial
    assert stages(1, 100, (14, 15)) == [13, None]  # th = (128 - 100) / 2
    model = MixAndMatchCVAE(Config(curriculum_step=1))
    assert model.schedule(3) == {"curriculum_stage": 2, "teacher_forcing": 1.0} and model.curriculum_stage == 2


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


@pytest.mark.parametrize("decoder", ["mlp", "autoregressive"])
def test_importance_weighted_nll_is_tighter_than_the_elbo(decoder):
    torch.manual_seed(0)
    model = MixAndMatchCVAE(Config(hidden_dim=16, latent_dim=4, decoder=decoder)).eval()
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


def test_metrics_command_end_to_end(tmp_path, mnist_root, in_process):
    in_process("train.py", "--data-root", mnist_root, "--epochs", "1", "--conditioning", "fixed",
               "--checkpoint-dir", "checkpoint", "--results-dir", "results", "--device", "cpu", cwd=tmp_path,
               check=True)
    args = ["--data-root", mnist_root, "--metrics", "--n-eval", 40, "--n-samples", 5, "--n-importance", 8,
            "--device", "cpu"]
    first = in_process("sample.py", *args, cwd=tmp_path, check=True)
    assert "training the digit classifier" in first.stdout and "fixed conditioning" in first.stdout
    assert (tmp_path / "checkpoint" / "digit_classifier.pth").is_file()
    second = in_process("sample.py", *args, cwd=tmp_path, check=True)  # cached classifier: the same table
    table = first.stdout.split("fixed conditioning")[1]
    assert "training" not in second.stdout and table == second.stdout.split("fixed conditioning")[1]
    for name in ["IW NLL", "diversity", "best-of-K", "active latent units", "conditional Inception Score"]:
        assert name in table
    history = (tmp_path / "results" / "history.json").read_text(encoding="utf-8")
    assert '"train_kl"' in history and (tmp_path / "results" / "curves.png").is_file()


def test_a_classifier_cached_from_other_mnist_files_is_retrained(tmp_path, mnist_root, capsys):
    other_root = tmp_path / "other"
    (other_root / "MNIST" / "raw").mkdir(parents=True)
    rng = np.random.default_rng(1)  # other images than mnist_root's
    write_idx(other_root / "MNIST" / "raw", "train", N_TRAIN, rng)
    write_idx(other_root / "MNIST" / "raw", "t10k", N_TEST, rng)
    path = str(tmp_path / "classifier.pth")
    for root, expected in [(mnist_root, "training the digit classifier once"), (mnist_root, None),
                           (str(other_root), "was made from other MNIST files")]:
        load_or_train_classifier(path, root, torch.device("cpu"), epochs=1)
        printed = capsys.readouterr().out
        assert (expected in printed) if expected else printed == ""
    # the bottom neighbours likewise: found once per data set
    path = str(tmp_path / "neighbours.pth")
    for root, expected in [(mnist_root, "finding the 4 training images nearest"), (mnist_root, None),
                           (str(other_root), "was made from other MNIST files")]:
        test_images, train_images = (load_mnist(root, train, "cpu")[0] for train in (False, True))
        indices, _ = load_or_find_neighbours(path, root, test_images, train_images, 4)
        printed = capsys.readouterr().out
        assert ((expected in printed) if expected else printed == "") and indices.shape == (N_TEST, 4)


def test_metrics_json_holds_the_printed_numbers(tmp_path, mnist_root, in_process):
    in_process("train.py", "--data-root", mnist_root, "--epochs", "1", "--checkpoint-dir", "checkpoint",
               "--results-dir", "results", "--device", "cpu", cwd=tmp_path, check=True)
    # sample.py in a fresh process here, and in this one at the end
    result = run_script("sample.py", "--data-root", mnist_root, "--metrics", "--n-eval", 40, "--n-samples", 5,
                        "--n-importance", 8, "--device", "cpu", "--temperature", 1.5, "--seed", 3,
                        "--json", "out/metrics.json", cwd=tmp_path)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert written["temperature"] == 1.5 and "temperature 1.5;" in result.stdout
    assert (written["seed"], written["alpha"], written["train_alpha"], written["train_seed"]) == (3, 64, 64, 0)
    assert written["checkpoint"].endswith("mix_match_01.pth")
    assert f"test accuracy {100 * written['classifier_accuracy']:.2f}%" in result.stdout
    printed = result.stdout.splitlines()
    assert len(written["metrics"]) == 21
    for row in written["metrics"].values():  # each printed line, rebuilt from the JSON
        value = f"{row['model']:9d}" if isinstance(row["model"], int) else f"{row['model']:9.3f}"
        reference = "" if row["real_top"] is None else f"{row['real_top']:9.3f}"
        assert f"{row['name']:<52} {value} {reference:>9}" in printed
    # the metrics draw from --seed alone: this process's earlier runs, a figure and another grid do not move them
    assert in_process("sample.py", "--data-root", mnist_root, "--metrics", "--n-eval", 40, "--n-samples", 5,
                      "--n-importance", 8, "--device", "cpu", "--temperature", 1.5, "--seed", 3, "--json",
                      "out/other.json", "--figure", "figure.png", "--n-images", 3, cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "out" / "other.json").read_text(encoding="utf-8")) == written


def test_sampling_flags_are_checked_before_any_work(tmp_path, in_process):
    for flags, message in [(["--temperature", "0"], "expected a finite number > 0, got '0'"),
                           (["--temperature", "-0.5"], "expected a finite number > 0, got '-0.5'"),
                           (["--json", "m.json"], "--json writes the metrics: add --metrics"),
                           (["--metrics", "--json", "m.txt"], "--json 'm.txt': cannot write the format '.txt'")]:
        result = in_process("sample.py", *flags, cwd=tmp_path)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- fidelity and coverage


def test_identical_sets_have_full_precision_recall_coverage_and_no_frechet_distance():
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    measures = manifold_measures(points, points.clone())
    assert [measures[k].item() for k in ("precision", "recall", "coverage")] == [1.0, 1.0, 1.0]
    assert 1.0 <= measures["density"].item() < 2.0  # its own ball and its neighbours' (about 1 for two samples)
    assert abs(frechet_distance(points, points.clone()).item()) < 1e-9


def test_disjoint_sets_share_nothing_and_their_frechet_distance_is_the_shift():
    real = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fake = real + 100  # the same shape, moved by 100 in each of the 4 coordinates
    measures = manifold_measures(real, fake)
    assert [measures[k].item() for k in ("precision", "recall", "density", "coverage")] == [0.0, 0.0, 0.0, 0.0]
    assert math.isclose(frechet_distance(real, fake).item(), 4 * 100 ** 2, rel_tol=1e-9)  # equal covariances


def test_an_outlier_among_the_reals_fools_precision_not_density():
    """99 real points packed near 0, one outlier at 10; the fakes near 15, far from every real
    digit but inside the outlier's wide k-NN ball: precision counts them all, density sees one
    ball of k = 5, coverage one real point of 100."""
    g = torch.Generator().manual_seed(0)
    real = torch.cat([0.1 * torch.randn(99, 2, generator=g), torch.tensor([[10.0, 0.0]])])
    fake = torch.tensor([15.0, 0.0]) + 0.1 * torch.randn(100, 2, generator=g)
    measures = manifold_measures(real, fake)
    assert measures["precision"].item() == 1.0
    assert math.isclose(measures["density"].item(), 1 / 5, rel_tol=1e-6)
    assert math.isclose(measures["coverage"].item(), 1 / 100, rel_tol=1e-6)
    assert measures["recall"].item() == 0.0


def test_frechet_distance_of_gaussians_with_a_known_answer():
    # diagonal covariances commute: |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2
    mu_a, mu_b, var_a, var_b = (torch.tensor(v, dtype=torch.float64) for v in
                                ([0.0, 1.0, 2.0], [1.0, 1.0, 0.0], [1.0, 4.0, 9.0], [4.0, 1.0, 9.0]))
    expected = (mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum()  # 5 + 1 + 1
    assert math.isclose(gaussian_frechet_distance(mu_a, var_a.diag(), mu_b, var_b.diag()).item(), expected.item())
    # a rotated covariance: the distance between N(0, A) and N(0, R A R^T) against the eigenvalues of A^(1/2) B A^(1/2)
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    cov_b = rotation @ var_a.diag() @ rotation.T
    sqrt_a = var_a.sqrt().diag()
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).sqrt().sum()
    assert math.isclose(gaussian_frechet_distance(torch.zeros(3, dtype=torch.float64), var_a.diag(),
                                                  torch.zeros(3, dtype=torch.float64), cov_b).item(),
                        (2 * var_a.sum() - 2 * cross).item(), rel_tol=1e-9)
    # from samples: the estimate approaches the Gaussians' distance
    g = torch.Generator().manual_seed(2)
    a = mu_a + var_a.sqrt() * torch.randn(100_000, 3, dtype=torch.float64, generator=g)
    b = mu_b + var_b.sqrt() * torch.randn(100_000, 3, dtype=torch.float64, generator=g)
    assert math.isclose(frechet_distance(a, b).item(), expected.item(), rel_tol=0.02)


def test_multimodal_best_of_k_and_conditional_coverage_on_hand_made_tops():
    completions = torch.tensor([[[0.0, 0.0], [10.0, 0.0]]])  # K = 2
    neighbour_tops = torch.tensor([[[0.0, 1.0], [10.0, 3.0], [5.0, 0.0]]])  # M = 3: nearest 1, 3 and 5 away
    best, covered = multimodal_distances(completions, neighbour_tops, threshold=3.0)
    assert torch.allclose(best, torch.tensor([3.0])) and torch.allclose(covered, torch.tensor([2 / 3]))


def test_bottom_neighbours_are_the_nearest_bottoms():
    g = torch.Generator().manual_seed(0)
    test_images, train_images = torch.rand(7, 784, generator=g), torch.rand(50, 784, generator=g)
    distances = torch.cdist(split_image(test_images)[1], split_image(train_images)[1])
    found = bottom_neighbours(test_images, train_images, 4, batch_size=3)
    assert torch.equal(found.sort(1).values, distances.argsort(1)[:, :4].sort(1).values)


def test_classifier_features_are_what_its_last_layer_reads():
    classifier = digit_classifier().eval()
    images = torch.rand(5, 784)
    features = classifier_features(classifier, images)
    assert features.shape == (5, 128) and features.min() >= 0  # after its ReLU
    assert torch.allclose(classifier[-1](features), classifier(images), atol=1e-6)


def test_the_digit_classifier_is_the_same_whatever_was_drawn_before_it(tmp_path, mnist_root, capsys):
    # its initial weights are its own: drawn from the caller's generator, the cache would depend on
    # which checkpoint's metrics built it (a mix-and-match model draws its Sampling first), and with
    # it every measure in the classifier's features (precision 0.81 or 0.73 for one recurrent model)
    torch.manual_seed(1)
    first = load_or_train_classifier(str(tmp_path / "a.pth"), mnist_root, "cpu", epochs=1)
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(2)
    second = load_or_train_classifier(str(tmp_path / "b.pth"), mnist_root, "cpu", epochs=1)
    assert torch.equal(torch.rand(3), expected)  # and the caller's draws do not move
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(2)
    cached = load_or_train_classifier(str(tmp_path / "b.pth"), mnist_root, "cpu", epochs=1)
    assert torch.equal(torch.rand(3), expected)  # loaded from its cache, neither
    for a, b in zip(first.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    cached = torch.load(tmp_path / "a.pth", weights_only=True)
    del cached["seed"]  # a cache the older code wrote
    torch.save(cached, tmp_path / "a.pth")
    capsys.readouterr()
    load_or_train_classifier(str(tmp_path / "a.pth"), mnist_root, "cpu", epochs=1)
    assert "does not fit this version of the code (KeyError: 'seed')" in capsys.readouterr().out
    assert torch.load(tmp_path / "a.pth", weights_only=True)["seed"] == 0


def test_one_pass_of_the_classifier_gives_its_log_probabilities_and_its_features():
    torch.manual_seed(0)
    classifier, images = digit_classifier().eval(), torch.rand(50, 784)
    log_probs, features = classifier_outputs(classifier, images, batch_size=20)  # batches of 20, 20 and 10
    with torch.no_grad():  # the whole network on the same batches (another batch size may round otherwise)
        assert torch.equal(log_probs, torch.cat([torch.log_softmax(classifier(batch), dim=1)
                                                 for batch in images.split(20)]))
    assert torch.equal(features, classifier_features(classifier, images, batch_size=20))
