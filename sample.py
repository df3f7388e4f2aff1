"""
Complete MNIST digits from their bottom with a trained Mix-and-Match CVAE.

Writes a grid with one test image per row: the ground truth, the condition alone (top blank),
then n-samples completions (generated top on the real bottom), each from its own z ~ N(0, I)
and its own Sampling of I.

    python3 sample.py --data-root ./data
"""
import argparse
import os

import torch
from torchvision.utils import save_image

from utils import (get_device, join_image, load_checkpoint, load_mnist, newest_checkpoint,
                   plot_sampling_resampling, positive_int, set_seed, split_image, to_grid_images)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="ours or the tutorial's plain state_dict (default: newest checkpoint/mix_match_*.pth)")
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--out", default="results/sampled.png", help="(default: results/sampled.png)")
    parser.add_argument("--n-images", type=positive_int, default=20, help="test images, one per row (default: 20)")
    parser.add_argument("--n-samples", type=positive_int, default=18, help="completions per image (default: 18)")
    parser.add_argument("--alpha", type=int, help="Sampling size (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)")
    parser.add_argument("--figure", metavar="PATH",
                        help="also draw one Sampling and the two Resamplings it gives to PATH")
    args = parser.parse_args()

    set_seed(args.seed)
    device = get_device(args.device)
    model, checkpoint = load_checkpoint(args.checkpoint or newest_checkpoint("checkpoint"), device)
    model.eval()
    alpha = checkpoint["alpha"] if args.alpha is None else args.alpha
    if not 0 <= alpha <= model.config.hidden_dim:
        parser.error(f"--alpha must be in 0..{model.config.hidden_dim} for this checkpoint, got {alpha}")

    test_images, _ = load_mnist(args.data_root, train=False, device=device)
    if args.n_images > len(test_images):
        parser.error(f"--n-images must be at most {len(test_images)}, the test set's size")
    images = test_images[:args.n_images]
    grid = completion_grid(model, images, alpha, args.n_samples)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save_image(to_grid_images(grid.reshape(-1, grid.shape[-1])).cpu(), args.out, nrow=grid.shape[1])
    print(f"wrote {args.out}: {args.n_images} rows x {grid.shape[1]} columns (alpha {alpha})")

    if args.figure:
        plot_sampling_resampling(*model.sampling(alpha), model.config.hidden_dim, args.figure)
        print(f"wrote {args.figure}")


@torch.no_grad()
def completion_grid(model, images, alpha, n_samples):
    """(N, 2 + n_samples, 784): truth, condition alone, completions. One batched call per column,
    so that each column has its own Sampling draw as well as its own latents."""
    data, condition = split_image(images)
    columns = [images, join_image(torch.zeros_like(data), condition)]
    columns += [join_image(model.sample(condition, alpha), condition) for _ in range(n_samples)]
    return torch.stack(columns, dim=1)


if __name__ == "__main__":
    main()
