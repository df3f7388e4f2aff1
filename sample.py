"""
Complete MNIST digits from their bottom with a trained Mix-and-Match CVAE.

Writes a grid with one test image per row: the ground truth, the condition alone (top blank),
then n-samples completions (generated top on the real bottom), each from its own
z ~ N(0, T^2 I) (T = --temperature, 1 being the tutorial's prior) and its own Sampling of I.

    python3 sample.py --data-root ./data
"""
import argparse
import math
import os
import sys

import torch

from model import join_image, split_image
from utils import (
    active_units,
    add_device_flags,
    check_output_file,
    classifier_features,
    classifier_log_probs,
    classifier_outputs,
    classifier_scores,
    completion_distances,
    explain_os_error,
    figure_formats,
    frechet_distance,
    image_formats,
    importance_weighted_nll,
    load_checkpoint,
    load_mnist,
    load_or_find_neighbours,
    load_or_train_classifier,
    manifold_measures,
    multimodal_distances,
    newest_checkpoint,
    plot_sampling_resampling,
    positive_float,
    positive_int,
    posterior_draws,
    save_image_grid,
    save_json,
    seed,
    set_seed,
    setup_device,
    writable_dir,
)

CHECKPOINT_DIR = "checkpoint"
# the metrics' caches (digit classifier, bottom neighbours): one per MNIST, shared by every checkpoint
CACHE_FILES = ("digit_classifier.pth", "mnist_neighbours.pth")
# the digit classifier this repository ships (utils.load_or_train_classifier), read where --cache-dir has none
SHIPPED_CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), CHECKPOINT_DIR, CACHE_FILES[0])
# pseudo ground truths per test bottom for the conditional measures: the 10th nearest training
# bottom is still a third of a random pair's distance away (median 1.87 against 5.63 on MNIST)
# and barely farther than the nearest (1.39); beyond, the neighbours' digits agree less
NEIGHBOURS = 10
# fidelity and coverage compare sets of at least this many points (k-NN balls of k = 5 need 6): the
# test images left out of --n-eval, and the --n-eval x --n-samples completions
MIN_SET_SIZE = 6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="ours or the tutorial's plain state_dict (default: newest checkpoint/mix_match_*.pth)")
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--out", default="results/sampled.png", help="(default: results/sampled.png)")
    parser.add_argument("--n-images", type=positive_int, default=20, help="test images, one per row (default: 20)")
    parser.add_argument("--n-samples", type=positive_int, default=18, help="completions per image (default: 18)")
    parser.add_argument("--alpha", type=int, help="Sampling size (default: the checkpoint's)")
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="completions decode z ~ N(0, T^2 I); the likelihoods of --metrics keep the "
                             "prior N(0, I) (default: 1.0)")
    parser.add_argument("--seed", type=seed, default=0, help="0 to 2**32 - 1 (default: 0)")
    add_device_flags(parser)
    parser.add_argument("--figure", metavar="PATH",
                        help="also draw one Sampling and the two Resamplings it gives to PATH")
    parser.add_argument("--metrics", action="store_true",
                        help="also print the evaluation table: likelihood, diversity, latent use, quality")
    parser.add_argument("--n-eval", type=positive_int, default=1000, help="test images for --metrics (default: 1000)")
    parser.add_argument("--n-importance", type=positive_int, default=100,
                        help="importance samples per image for the NLL of --metrics (default: 100)")
    parser.add_argument("--json", metavar="PATH", help="with --metrics, also write them to PATH as JSON")
    parser.add_argument("--cache-dir", default=CHECKPOINT_DIR,
                        help="with --metrics, where the bottom neighbours are cached, built on first use, and a "
                             "digit classifier for other MNIST files; the shipped checkpoint/digit_classifier.pth is "
                             "read where this folder holds none; another folder where checkpoint/ is read-only "
                             f"(default: {CHECKPOINT_DIR})")
    args = parser.parse_args()
    try:
        run(parser, args)
    except OSError as e:  # a full disk, say: atomic writes leave no half-written file
        sys.exit(f"error: {explain_os_error(e)}, then run the command again; the files written before it are whole.")
    except KeyboardInterrupt:
        print("interrupted: the files written so far are whole; nothing else was changed", file=sys.stderr)
        sys.exit(130)


def run(parser, args):
    # outputs are checked before any work, so that a wrong path or extension costs nothing
    check_output_file(args.out, "--out", image_formats())
    if args.figure:
        check_output_file(args.figure, "--figure", figure_formats())
    classifier_path, neighbours_path = (os.path.join(args.cache_dir, name) for name in CACHE_FILES)
    cached = os.path.isfile(neighbours_path) and (os.path.isfile(classifier_path) or os.path.isfile(SHIPPED_CLASSIFIER))
    if args.metrics and not cached:
        writable_dir(args.cache_dir, "--cache-dir")
    if args.metrics and args.n_samples < 2:
        parser.error("--metrics needs --n-samples >= 2 (diversity compares completions)")
    if args.metrics and args.n_eval < 2:
        parser.error("--metrics needs --n-eval >= 2 (active units compare the posterior means of images)")
    if args.metrics and args.n_eval * args.n_samples < MIN_SET_SIZE:
        parser.error(f"--metrics needs --n-eval x --n-samples >= {MIN_SET_SIZE} completions (the fidelity measures' "
                     f"k-NN balls of k = 5), got {args.n_eval} x {args.n_samples}")
    if args.json and not args.metrics:
        parser.error("--json writes the metrics: add --metrics")
    if args.json:
        check_output_file(args.json, "--json", {"json"})
    set_seed(args.seed)
    device = setup_device(args)
    checkpoint_path = args.checkpoint or newest_checkpoint(CHECKPOINT_DIR)
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    model.eval()
    settings = checkpoint["config"]  # the run's (model.Config), or the tutorial's for its state_dict
    alpha = settings["alpha"] if args.alpha is None else args.alpha
    if not 0 <= alpha <= model.config.hidden_dim:
        parser.error(f"--alpha must be in 0..{model.config.hidden_dim} for this checkpoint, got {alpha}")
    if args.figure and model.config.conditioning == "concat":
        parser.error(f"--figure draws a Sampling, and {checkpoint_path} is a concat model, which draws none")

    test_images, test_labels = load_mnist(args.data_root, train=False, device=device)
    if args.n_images > len(test_images):
        parser.error(f"--n-images must be at most {len(test_images)}, the test set's size")
    if args.metrics and args.n_eval > len(test_images) - MIN_SET_SIZE:
        parser.error(f"--n-eval must be at most {len(test_images) - MIN_SET_SIZE}: the fidelity measures "
                     f"compare the completions with the test images left out ({MIN_SET_SIZE} at least)")
    images = test_images[:args.n_images]
    grid = completion_grid(model, images, alpha, args.n_samples, args.temperature)
    if not bool(grid.isfinite().all()):  # z = T * eps overflows the decoder: a grid of noise, metrics of NaN
        sys.exit(f"error: the completions are not finite numbers at --temperature {args.temperature:g}; "
                 f"use a lower one")
    save_image_grid(grid.flatten(0, 1), args.out, nrow=grid.shape[1])
    print(f"wrote {args.out}: {args.n_images} rows x {grid.shape[1]} columns (alpha {alpha}, "
          f"temperature {args.temperature:g})")

    if args.figure:
        plot_sampling_resampling(*model.sampling(alpha), model.config.hidden_dim, args.figure)
        print(f"wrote {args.figure}")

    if args.metrics:
        # one classifier, and one set of bottom neighbours, for every checkpoint, so that their scores compare
        classifier = load_or_train_classifier(classifier_path, args.data_root, device, shipped=SHIPPED_CLASSIFIER)
        train_images = load_mnist(args.data_root, train=True, device=device)[0]
        neighbours, threshold = load_or_find_neighbours(neighbours_path, args.data_root, test_images, train_images,
                                                        NEIGHBOURS)
        accuracy = (classifier_log_probs(classifier, test_images).argmax(1) == test_labels).float().mean().item()
        print(f"\n{checkpoint_path}: {model.config.conditioning} conditioning, {model.config.decoder} decoder, "
              f"alpha {alpha}, temperature {args.temperature:g}; first {args.n_eval} test images, "
              f"K = {args.n_samples} completions, "
              f"S = {args.n_importance} importance samples, seed {args.seed}; digit classifier test accuracy "
              f"{100 * accuracy:.2f}%")
        real = {"held_out": test_images[args.n_eval:], "train": train_images, "threshold": threshold,
                "neighbour_tops": split_image(train_images[neighbours[:args.n_eval]])[0]}
        set_seed(args.seed)  # the metrics' own draws: the grid, --figure and --n-images do not move them
        rows = evaluation_metrics(model, classifier, test_images[:args.n_eval], alpha, args.n_samples,
                                  args.n_importance, args.temperature, real)
        if settings["free_bits"]:  # the table is the model's likelihood, not what it was trained on
            print(f"trained with free bits {settings['free_bits']:g}: the likelihoods below are the model's true "
                  f"ELBO and IW NLL, not its training objective")
        print_metrics(rows, model.config, alpha)
        if args.json:
            save_json({"checkpoint": checkpoint_path, "conditioning": model.config.conditioning,
                       "decoder": model.config.decoder, "alpha": alpha,
                       "train_alpha": settings["alpha"], "train_seed": settings["seed"],
                       "temperature": args.temperature, "seed": args.seed, "n_eval": args.n_eval,
                       "n_samples": args.n_samples, "n_importance": args.n_importance,
                       "classifier_accuracy": accuracy,
                       "metrics": {key: {"name": name, "model": value, "real_top": reference}
                                   for key, name, value, reference in rows}}, args.json, indent=2)
            print(f"wrote {args.json}")


@torch.no_grad()
def complete(model, condition, alpha, n_samples, temperature=1.0, z=None, sampled_indices=None):
    """(N, n_samples, 784): generated tops on the real bottoms. One batched call per completion,
    so that each has its own Sampling draw as well as its own latents; a z (N, latent_dim) or
    sampled_indices given are held fixed across the completions instead."""
    tops = torch.stack([model.sample(condition, alpha, z, temperature, sampled_indices) for _ in range(n_samples)],
                       dim=1)
    return join_image(tops, condition[:, None].expand(-1, n_samples, -1))


@torch.no_grad()
def completion_grid(model, images, alpha, n_samples, temperature=1.0):
    """(N, 2 + n_samples, 784): truth, condition alone (top blank), completions."""
    data, condition = split_image(images)
    condition_alone = join_image(torch.zeros_like(data), condition)
    completions = complete(model, condition, alpha, n_samples, temperature)
    return torch.cat([images[:, None], condition_alone[:, None], completions], dim=1)


@torch.no_grad()
def evaluation_metrics(model, classifier, images, alpha, n_samples, n_importance, temperature, real):
    """The paper's measures adapted to MNIST completion (samples/README.md, "The measures"), per image, averaged
    over the images: rows of (key, name, model's value, real top's value or None). The
    likelihoods use the model's prior; the completions (diversity, best-of-K, the classifier's
    measures) decode z ~ N(0, temperature^2 I). The real tops give the classifier's reference.

    `real` holds what the completions are compared with: "held_out", test images not among
    `images`; "train", training images; "neighbour_tops" (N, M, 500), the tops of each image's
    bottom neighbours, and the "threshold" of the conditional coverage."""
    data, condition = split_image(images)
    log_w, bce, kl, means = posterior_draws(model, data, condition, alpha, n_importance)
    completed = complete(model, condition, alpha, n_samples, temperature)  # (N, K, 784)
    diversity, best_error, mean_error = completion_distances(split_image(completed)[0], data)
    # the classifier once over the completions: its log-probabilities, and its features for fidelity_rows
    log_probs, features = (x.unflatten(0, completed.shape[:2])
                           for x in classifier_outputs(classifier, completed.flatten(0, 1)))  # (N, K, ...)
    scores = classifier_scores(log_probs)  # over the K completions of each image
    truth = classifier_scores(classifier_log_probs(classifier, images)[:, None])  # K = 1: the real top
    # diversity by source (samples/README.md, "Does Mix-and-Match keep the latent in use?"): one Sampling held
    # for all K, so that only z differs; one z per image held for all K, so that only I differs
    z_alone = complete(model, condition, alpha, n_samples, temperature, sampled_indices=model.sampling(alpha)[0])
    one_z = temperature * torch.randn(len(images), model.config.latent_dim, device=images.device)
    undefined = zero_by_construction(model.config, alpha)
    sampling_alone = (None if "diversity_sampling" in undefined else
                      complete(model, condition, alpha, n_samples, z=one_z))
    fidelity, fidelity_of_real = fidelity_rows(classifier, features, real)
    neighbour_tops, threshold = real["neighbour_tops"], real["threshold"]
    multimodal = multimodal_distances(split_image(completed)[0], neighbour_tops, threshold)
    multimodal_of_truth = multimodal_distances(data[:, None], neighbour_tops, threshold)  # K = 1: the real top
    rows = [
        ("rec_bce", "reconstruction BCE, 500 pixels (nats)", bce.mean(), None),
        ("kl", "KL (nats)", kl.mean(), None),
        ("neg_elbo", "negative ELBO = BCE + KL (nats)", (bce + kl).mean(), None),
        ("iw_nll", f"IW NLL -log p(top | bottom), S={n_importance} (nats)", importance_weighted_nll(log_w).mean(),
         None),
        ("diversity", f"diversity: mean distance between the K={n_samples}", diversity.mean(), None),
        ("diversity_z", "diversity from z alone (one Sampling for the K)",
         completion_distances(split_image(z_alone)[0], data)[0].mean(), None),
        ("diversity_sampling", "diversity from the Sampling alone (one z for the K)",
         None if sampling_alone is None else completion_distances(split_image(sampling_alone)[0], data)[0].mean(),
         None),
        ("best_of_k", "best-of-K distance to the true top", best_error.mean(), None),
        ("mean_distance", "mean distance to the true top", mean_error.mean(), None),
        ("active_units", f"active latent units (of {model.config.latent_dim})", active_units(means), None),
        ("confidence", "classifier confidence", scores[0].mean(), truth[0].mean()),
        ("confident_share", "share with confidence >= 0.9", scores[1].mean(), truth[1].mean()),
        ("distinct_digits", "distinct digits among the K", scores[2].mean(), truth[2].mean()),
        ("inception_score", "conditional Inception Score", scores[3].mean(), truth[3].mean()),
        *[(key, name, fidelity[key], fidelity_of_real[key]) for key, name in FIDELITY_NAMES.items()],
        ("mm_best_of_k", f"multi-modal best-of-K to M={neighbour_tops.shape[1]} neighbour tops",
         multimodal[0].mean(), multimodal_of_truth[0].mean()),
        ("mm_coverage", f"share of neighbour tops within {threshold:.2f} of one", multimodal[1].mean(),
         multimodal_of_truth[1].mean()),
    ]
    # n/a where a zero would read as a finding, and where a measure is not a number for these images
    # (strict JSON has no NaN)
    return [(key, name, None if key in undefined else finite_or_none(value), finite_or_none(ref))
            for key, name, value, ref in rows]


def finite_or_none(value):
    if value is None or isinstance(value, int):
        return value
    return float(value) if math.isfinite(value) else None


def zero_by_construction(config, alpha):
    """{metric key: why} for the diversity by source that is 0 by construction: the Sampling alone
    where I never changes, or changes nothing; z alone where the decoder takes no entry from z."""
    why = {}
    if config.conditioning != "mix-and-match":
        why["diversity_sampling"] = (f"{config.conditioning} conditioning: the Sampling alone gives no diversity by "
                                     "construction (" + ("its I is always the first alpha indices"
                                                         if config.conditioning == "fixed" else "it draws no Sampling")
                                     + ")")
    elif alpha in (0, config.hidden_dim):
        why["diversity_sampling"] = (f"alpha {alpha}: the Sampling alone gives no diversity by construction (every "
                                     f"Sampling splits the hidden vector the same way)")
    if alpha == config.hidden_dim and config.conditioning != "concat":
        why["diversity_z"] = (f"alpha {alpha}: z alone gives no diversity by construction (the decoder's Resampling "
                              f"takes no entry from z)")
    return why


FIDELITY_NAMES = {"precision": "precision, k=3 (fidelity)", "recall": "recall, k=3 (coverage)",
                  "density": "density, k=5 (fidelity)", "coverage": "coverage, k=5",
                  "frechet": "Fréchet distance, classifier features"}


def fidelity_rows(classifier, completed_features, real):
    """Fidelity and coverage of the completed images, given as the classifier's features (N, K,
    128), against real test images they do not share a bottom with, in those features; and, for
    reference, of real training images in their place. Every set has the same size n, the smallest
    of the three (9000 with the defaults: the 9000 test images left out of 1000 evaluated, against
    the first 9 of the 18 completions of each), since k-NN balls shrink as a set grows."""
    n = min(completed_features.shape[0] * completed_features.shape[1], len(real["held_out"]), len(real["train"]))
    fake = completed_features.transpose(0, 1).flatten(0, 1)[:n]  # completion k of every image before k + 1
    held_out, train = (classifier_features(classifier, x) for x in (real["held_out"][:n], real["train"][:n]))
    return [{**manifold_measures(held_out, x), "frechet": frechet_distance(held_out, x)} for x in (fake, train)]


def print_metrics(rows, config, alpha):
    print(f"{'metric (per image)':<52} {'model':>9} {'real top':>9}")
    for _, name, value, reference in rows:
        reference = "" if reference is None else f"{reference:9.3f}"
        value = "n/a" if value is None else f"{value:9d}" if isinstance(value, int) else f"{value:9.3f}"
        print(f"{name:<52} {value:>9} {reference:>9}")
    undefined = zero_by_construction(config, alpha)
    for key, name, value, _ in rows:  # why each n/a above
        if value is None:
            print(f"n/a: {undefined.get(key, f'{name}: not a finite number for these images')}")


if __name__ == "__main__":
    main()
