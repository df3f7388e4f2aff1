"""
Train the Mix-and-Match CVAE on MNIST completion with the tutorial's recipe:
BCE (sum) + KL * logistic-annealed weight, Adam lr 1e-4, batch 128, 50 epochs, alpha 64.

    python3 train.py --data-root ./data
"""
import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from model import CONDITIONINGS, MixAndMatchCVAE, ModelConfig
from utils import (get_device, join_image, kl_anneal_function, load_checkpoint, load_mnist, loss_terms,
                   plot_history, positive_float, positive_int, save_checkpoint, set_seed, split_image,
                   to_grid_images)

# KL annealing (tutorial): the KL weight follows a logistic ramp over training steps,
# 0.007 at step 0, 0.5 at step 2500 (epoch ~5.3 with batch 128), ~1 from step 5000 on
ANNEAL_FUNCTION, ANNEAL_K, ANNEAL_X0 = "logistic", 0.002, 2500


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=50, help="train until this epoch (default: 50)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="(default: 128)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    parser.add_argument("--alpha", type=int, default=64,
                        help="Sampling: how many of the hidden_dim indices form I (default: 64)")
    parser.add_argument("--hidden-dim", type=positive_int, default=128, help="(default: 128)")
    parser.add_argument("--latent-dim", type=positive_int, default=32, help="(default: 32)")
    parser.add_argument("--conditioning", choices=CONDITIONINGS, default="mix-and-match",
                        help="mix-and-match: a random I per pass; fixed: I = the first alpha indices, "
                             "the paper's deterministic baseline (default: mix-and-match)")
    parser.add_argument("--curriculum-step", type=int, default=0, metavar="N",
                        help="curriculum of perturbation (paper, section 3.3): stage floor(e / N) at "
                             "epoch e (from 0); 0 = off, the tutorial (default: 0)")
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--checkpoint-dir", default="checkpoint", help="(default: checkpoint)")
    parser.add_argument("--results-dir", default="results", help="(default: results)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--resume", metavar="PATH",
                        help="continue a run exactly from its checkpoint (sizes, alpha, conditioning "
                             "and curriculum come from it)")
    args = parser.parse_args()
    if not 0 <= args.alpha <= args.hidden_dim:
        parser.error(f"--alpha must be in 0..{args.hidden_dim} (--hidden-dim), got {args.alpha}")
    if args.curriculum_step < 0 or (args.curriculum_step and args.conditioning == "fixed"):
        parser.error("--curriculum-step must be >= 0, and 0 with --conditioning fixed")

    set_seed(args.seed)
    device = get_device(args.device)
    train_images, _ = load_mnist(args.data_root, train=True, device=device)
    test_images, _ = load_mnist(args.data_root, train=False, device=device)

    if args.resume:
        model, checkpoint = load_checkpoint(args.resume, device)
        if "optimizer" not in checkpoint:
            raise SystemExit(f"error: {args.resume!r} holds model weights only (no optimizer state); "
                             f"--resume needs a checkpoint written by train.py")
        alpha, start_epoch, step = checkpoint["alpha"], checkpoint["epoch"] + 1, checkpoint["step"]
        curriculum_step, history = checkpoint["curriculum_step"], checkpoint["history"]
    else:
        config = ModelConfig(hidden_dim=args.hidden_dim, latent_dim=args.latent_dim, conditioning=args.conditioning)
        model = MixAndMatchCVAE(config).to(device)
        alpha, start_epoch, step, curriculum_step, history = args.alpha, 1, 0, args.curriculum_step, []
    # fused: one kernel updates all parameters; the default per-parameter loop costs more than
    # this small model's arithmetic on a CPU (tests/bench_train.py)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    if args.resume:
        restore_training_state(checkpoint, optimizer)
        print(f"resuming {args.resume} after epoch {start_epoch - 1} (step {step}), alpha {alpha}")

    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {device}, alpha {alpha}, "
          f"{model.config.conditioning} conditioning, curriculum step {curriculum_step or 'off'}")
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        stage = curriculum_stage(epoch, curriculum_step, alpha, model.config.hidden_dim)
        rec, kl, step = train_epoch(model, optimizer, train_images, args.batch_size, alpha, step, stage)
        test_loss = evaluate(model, test_images, alpha)  # with the Sampling used at test time
        record = {"epoch": epoch, "train_rec": rec, "train_kl": kl, "kl_weight": anneal_weight(step),
                  "test_loss": test_loss, "curriculum_stage": stage, "seconds": time.time() - t0}
        history.append(record)
        save_reconstructions(model, test_images[:100], alpha, os.path.join(args.results_dir, f"rec_{epoch:02d}.png"))
        save_checkpoint(os.path.join(args.checkpoint_dir, f"mix_match_{epoch:02d}.pth"), model, optimizer,
                        alpha, epoch, step, args, curriculum_step=curriculum_step, history=history)
        with open(os.path.join(args.results_dir, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
        plot_history({model.config.conditioning: history}, os.path.join(args.results_dir, "curves.png"))
        print(f"epoch {epoch:2d} | rec {rec:7.2f} | kl {kl:6.2f} | kl weight {record['kl_weight']:.3f} "
              f"| test loss {test_loss:7.2f} | {record['seconds']:5.1f} s"
              + ("" if stage is None else f" | curriculum stage {stage}"), flush=True)


def anneal_weight(step):
    return kl_anneal_function(ANNEAL_FUNCTION, step, ANNEAL_K, ANNEAL_X0)


def curriculum_stage(epoch, curriculum_step, alpha, hidden_dim):
    """Curriculum learning of perturbation (paper, section 3.3): at epoch e (counted from 0),
    s = floor(e / N) of the alpha indices are drawn at random, the rest taken from a fixed known
    part, until s reaches min(alpha, hidden_dim - alpha) / 2; None then (and with N = 0) means
    all alpha are drawn from the whole hidden vector, as at test time."""
    if curriculum_step == 0:
        return None
    stage = (epoch - 1) // curriculum_step
    return stage if stage < min(alpha / 2, (hidden_dim - alpha) / 2) else None


def train_epoch(model, optimizer, images, batch_size, alpha, step, curriculum_stage=None):
    """One pass over the training images in shuffled batches of batch_size, the last partial one
    kept; returns (BCE per image, KL per image, step)."""
    model.train()
    rec_sum = kl_sum = 0.0
    # a DataLoader over the indices shuffles with the same generator draws as the tutorial's
    # DataLoader over the images, so a seed gives the tutorial's batches; the images themselves
    # are sliced from one tensor
    for indices in DataLoader(range(len(images)), batch_size=batch_size, shuffle=True):
        data, condition = split_image(images.index_select(0, indices))  # faster than images[indices]
        reconstruction, mu, logvar = model(data, condition, alpha, curriculum_stage)
        bce, kl = loss_terms(reconstruction, data, mu, logvar)
        loss = bce + anneal_weight(step) * kl  # the KL weight is annealed per step, not per epoch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        rec_sum += bce.detach()  # kept on the device: no synchronisation per step
        kl_sum += kl.detach()
    return rec_sum.item() / len(images), kl_sum.item() / len(images), step


@torch.no_grad()
def evaluate(model, images, alpha, batch_size=1000):
    """Test loss per image: BCE + KL, the negative ELBO (unweighted, so that epochs compare)."""
    model.eval()
    total = 0.0
    for batch in images.split(batch_size):
        data, condition = split_image(batch)
        reconstruction, mu, logvar = model(data, condition, alpha)
        bce, kl = loss_terms(reconstruction, data, mu, logvar)
        total += (bce + kl).item()
    return total / len(images)


@torch.no_grad()
def save_reconstructions(model, images, alpha, path):
    """The images (100 test images), 10 per row: reconstructed top on the real bottom."""
    model.eval()
    data, condition = split_image(images)
    reconstruction = model(data, condition, alpha)[0]
    save_image(to_grid_images(join_image(reconstruction, condition)).cpu(), path, nrow=10)


def restore_training_state(checkpoint, optimizer):
    """Optimizer and RNG state, so that a resumed run draws what the uninterrupted one would."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
    if torch.cuda.is_available() and len(checkpoint["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([state.cpu() for state in checkpoint["rng"]["cuda"]])


if __name__ == "__main__":
    main()
