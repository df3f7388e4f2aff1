"""
Train the Mix-and-Match CVAE on MNIST completion with the tutorial's recipe:
BCE (sum) + KL * logistic-annealed weight, Adam lr 1e-4, batch 128, 50 epochs, alpha 64.

    python3 train.py --data-root ./data
"""
import argparse
import math
import os
import signal
import sys
import time
from dataclasses import fields

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader

from model import Config, MixAndMatchCVAE, flag, free_bits_kl, join_image, loss_terms, split_image
from utils import (
    add_device_flags,
    explain_os_error,
    load_checkpoint,
    load_mnist,
    plot_history,
    save_checkpoint,
    save_image_grid,
    save_json,
    set_seed,
    setup_device,
    shell_command,
    signals_deferred,
    writable_dir,
)

# KL annealing (tutorial): the KL weight follows a logistic ramp over training steps,
# 0.007 at step 0, 0.5 at step 2500 (epoch ~5.3 with batch 128), ~1 from step 5000 on
ANNEAL_FUNCTION, ANNEAL_K, ANNEAL_X0 = "logistic", 0.002, 2500
# results/curves.png is redrawn once this many seconds have passed since its last drawing, and after
# the last epoch: drawn every epoch, matplotlib would take a share of each short epoch (tests/bench_train.py)
CURVES_EVERY_S = 30


def kl_anneal_function(anneal_function, step, k, x0):
    """Weight of the KL term at a training step (tutorial; Bowman et al. 2016): a logistic ramp
    centred on step x0 with slope k, or a linear ramp reaching 1 at step x0."""
    if anneal_function == "logistic":
        return float(1 / (1 + np.exp(-k * (step - x0))))
    if anneal_function == "linear":
        return min(1.0, step / x0)
    raise ValueError(f"anneal_function must be 'logistic' or 'linear', got {anneal_function!r}")


def anneal_weight(step):
    return kl_anneal_function(ANNEAL_FUNCTION, step, ANNEAL_K, ANNEAL_X0)


def train_epoch(model, optimizer, images, config, step):
    """One pass over the training images in shuffled batches of config.batch_size, the last partial
    one kept unless it holds a single image (BatchNorm cannot train on it); returns (BCE per image,
    KL per image, step). The KL returned is the true one, also when free bits changes the loss."""
    model.train()  # model.schedule(epoch) has set the epoch's curriculum stage and teacher forcing
    rec_sum = kl_sum = 0.0
    trained = 0
    # a DataLoader over the indices shuffles with the same generator draws as the tutorial's
    # DataLoader over the images, so a seed gives the tutorial's batches; the images themselves
    # are sliced from one tensor. The epoch's whole order goes to the images' device in one copy,
    # where a copy of each batch's indices would make the CPU wait for the GPU at every step
    order = torch.cat(list(DataLoader(range(len(images)), batch_size=config.batch_size, shuffle=True)))
    batches = [indices for indices in to_device(order, images).split(config.batch_size) if len(indices) > 1]
    # the KL weight is annealed per step: the epoch's weights reach the device in one copy too
    kl_weights = to_device(torch.tensor([anneal_weight(s) for s in range(step, step + len(batches))]), images)
    for indices, kl_weight in zip(batches, kl_weights):
        data, condition = split_image(images.index_select(0, indices))  # faster than images[indices]
        reconstruction, mu, logvar = model(data, condition, config.alpha)
        bce, kl = loss_terms(reconstruction, data, mu, logvar)
        objective = free_bits_kl(mu, logvar, config.free_bits) if config.free_bits else kl
        loss = bce + kl_weight * objective
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        rec_sum += bce.detach()  # kept on the device: no synchronisation per step
        kl_sum += kl.detach()
        trained += len(indices)
    return rec_sum.item() / trained, kl_sum.item() / trained, step


def to_device(tensor, like):
    """The tensor on the device of `like`, in a copy that the CPU does not wait for on a GPU."""
    return (tensor.pin_memory() if like.is_cuda else tensor).to(like.device, non_blocking=True)


@torch.inference_mode()  # as no_grad, a little cheaper: the same values and draws
def evaluate(model, images, alpha, batch_size=1000):
    """Test loss per image: BCE + KL, the negative ELBO (unweighted, so that epochs compare)."""
    model.eval()
    losses = []
    for batch in images.split(batch_size):
        data, condition = split_image(batch)
        reconstruction, mu, logvar = model(data, condition, alpha)
        bce, kl = loss_terms(reconstruction, data, mu, logvar)
        losses.append(bce + kl)
    # read once, then summed as Python floats (float64, in order): MPS has no float64
    return sum(torch.stack(losses).tolist()) / len(images)


@torch.inference_mode()
def save_reconstructions(model, images, alpha, path):
    """The images (100 test images), 10 per row: reconstructed top on the real bottom."""
    model.eval()
    data, condition = split_image(images)
    reconstruction = model(data, condition, alpha)[0]
    save_image_grid(join_image(reconstruction, condition), path, nrow=10)


def main():
    parser = make_parser()
    args = parser.parse_args()
    # everything a user can get wrong is checked here, before data is loaded or an epoch trained
    device = setup_device(args)
    model, checkpoint = load_checkpoint(args.resume, device, resume=True) if args.resume else (None, None)
    config = run_config(parser, args, checkpoint)
    writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    writable_dir(args.results_dir, "--results-dir")
    set_seed(config.seed)
    model = model or build_model(config, device)
    # SIGTERM (a cluster's scheduler, `kill`) stops training like Ctrl-C: between whole files
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    fit(args, config, device, model, checkpoint)


def fit(args, config, device, model, checkpoint):
    """Train from scratch or on from the checkpoint to config.epochs, each epoch's files written
    whole; Ctrl-C, SIGTERM, a divergence or a full disk end in one line that says how to continue."""
    epoch, last_checkpoint = None, args.resume  # for the message if it stops
    try:
        train_images, _ = load_mnist(args.data_root, train=True, device=device)
        test_images, _ = load_mnist(args.data_root, train=False, device=device)
        # a second train.py writing into the same folder would interleave its checkpoints with this one's;
        # the system releases the lock when its process ends, however it ends
        with FileLock(os.path.join(args.checkpoint_dir, "train.lock"), timeout=0):
            model, optimizer, start_epoch, step, history = prepare(args, config, device, model, checkpoint,
                                                                   len(train_images))
            curves_drawn = time.time()
            for epoch in range(start_epoch, config.epochs + 1):
                t0 = time.time()
                schedule = model.schedule(epoch)  # set as model.train() is, for the epoch
                rec, kl, step = train_epoch(model, optimizer, train_images, config, step)
                test_loss = evaluate(model, test_images, config.alpha)  # with the Sampling used at test time
                if not all(map(math.isfinite, (rec, kl, test_loss))) or not is_finite(model):
                    raise FloatingPointError(f"training diverged in epoch {epoch} (train BCE {rec:.4g}, KL {kl:.4g}, "
                                             f"test loss {test_loss:.4g}); no checkpoint was written for it")
                record = {"epoch": epoch, "train_rec": rec, "train_kl": kl, "kl_weight": anneal_weight(step),
                          "test_loss": test_loss, **schedule, "seconds": time.time() - t0}
                history.append(record)
                with signals_deferred():  # Ctrl-C waits for this epoch's files, so that the message can name them
                    save_reconstructions(model, test_images[:100], config.alpha,
                                         os.path.join(args.results_dir, f"rec_{epoch:02d}.png"))
                    path = checkpoint_path(args, epoch)
                    save_checkpoint(path, model, optimizer, config, epoch, step, history)
                    last_checkpoint = path
                    save_json(history, os.path.join(args.results_dir, "history.json"))
                    if epoch == config.epochs or time.time() - curves_drawn >= CURVES_EVERY_S:
                        plot_history({config.conditioning: history}, os.path.join(args.results_dir, "curves.png"))
                        curves_drawn = time.time()
                stage, forcing = schedule["curriculum_stage"], schedule["teacher_forcing"]
                print(f"epoch {epoch:2d} | rec {rec:7.2f} | kl {kl:6.2f} | kl weight {record['kl_weight']:.3f} "
                      f"| test loss {test_loss:7.2f} | {record['seconds']:5.1f} s"
                      + ("" if stage is None else f" | curriculum stage {stage}")
                      + (f" | teacher forcing {forcing:.2f}" if config.teacher_forcing_epochs else ""), flush=True)
    except (KeyboardInterrupt, FloatingPointError, OSError) as e:
        stop(e, args, config, epoch, last_checkpoint)


# -----------------------------------------------------------------------------
# the flags, resuming, and how a run that stops says how to continue

# --help of each setting, the flags being model.Config's fields after output_dim (the task's sizes)
HELP = {
    "hidden_dim": "", "latent_dim": "",
    "conditioning": "mix-and-match: a random I per pass (the paper's); fixed: I = the first alpha indices, the "
                    "paper's deterministic split; concat: the ordinary CVAE, no Sampling",
    "decoder": "mlp: the tutorial's; autoregressive: each top pixel also sees the pixels before it; recurrent: the "
               "paper's GRU over image rows, its initial state the fusion",
    "history_dropout": "autoregressive and recurrent decoders: in training, each previous pixel or row they are fed "
                       "is zeros with probability P (Bowman et al. 2016)",
    "teacher_forcing_epochs": "recurrent decoder: the probability of feeding the true previous row falls linearly "
                              "from 1 to 0 over N epochs, then it is fed its own; 0 = always the true one",
    "alpha": "Sampling: how many of the hidden_dim indices form I",
    "epochs": "train until this epoch",
    "batch_size": "at least 2, for BatchNorm",
    "lr": "Adam learning rate",
    "curriculum_step": "curriculum of perturbation (paper, section 3.3): stage floor(e / N) at epoch e (from 0); "
                       "0 = off, the tutorial",
    "free_bits": "train on max(LAMBDA, KL) per latent unit, the KL averaged over the batch (Kingma et al. 2016), in "
                 "nats; 0 = the tutorial's loss",
    "seed": "0 to 2**32 - 1",
}
METAVARS = {"history_dropout": "P", "teacher_forcing_epochs": "N", "curriculum_step": "N", "free_bits": "LAMBDA"}
# what a resumed run may change; the other settings are its checkpoint's
CHANGEABLE = ("epochs", "batch_size", "lr")


def make_parser():
    """A flag for each setting (model.Config), its default the tutorial's; the run's own flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        if f.name in HELP:
            default = "25 with --decoder recurrent, else 0" if f.default is None else f"{f.default:g}" \
                if f.type is float else f.default
            parser.add_argument(f"--{flag(f.name)}", type=f.type, metavar=METAVARS.get(f.name),
                                help=f"{HELP[f.name]} (default: {default})".lstrip())
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--checkpoint-dir", default="checkpoint", help="(default: checkpoint)")
    parser.add_argument("--results-dir", default="results", help="(default: results)")
    add_device_flags(parser)
    parser.add_argument("--resume", metavar="PATH",
                        help="continue a run exactly from its checkpoint, with its settings; only --epochs, "
                             "--batch-size and --lr may change")
    return parser


def run_config(parser, args, checkpoint):
    """The run's settings: the flags given over the tutorial's, or on --resume over the checkpoint's,
    which fix the model and the loss (a flag that contradicts them is refused)."""
    given = {name: getattr(args, name) for name in HELP if getattr(args, name) is not None}
    if checkpoint:
        saved = checkpoint["config"]
        contradictions = [f"--{flag(name)} {value} (the checkpoint has {saved[name]})"
                          for name, value in given.items() if name not in CHANGEABLE and value != saved[name]]
        if contradictions:
            raise SystemExit(f"error: {', '.join(contradictions)}: a resumed run keeps its checkpoint's model and "
                             f"loss. Leave these flags out, or start a new run without --resume.")
        given = {**saved, **given}
    try:
        config = Config(**given).check()
    except ValueError as e:
        parser.error(str(e))
    if checkpoint and checkpoint["epoch"] >= config.epochs:
        raise SystemExit(f"error: {args.resume} is already at epoch {checkpoint['epoch']}, and --epochs is "
                         f"{config.epochs}: nothing left to train. Pass --epochs with a larger number.")
    return config


def prepare(args, config, device, model, checkpoint, n_train):
    """(model, optimizer, first epoch, step, history): new, or as the checkpoint left them."""
    # fused: one kernel updates all parameters; the default per-parameter loop costs more than
    # this small model's arithmetic on a CPU (tests/bench_train.py)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    start_epoch, step, history = 1, 0, []
    if checkpoint:
        start_epoch, step, history = resume(checkpoint, optimizer, config, device)
        print(f"resuming {args.resume} after epoch {checkpoint['epoch']} (step {step})")
    if n_train % config.batch_size == 1:
        print(f"note: {n_train} training images leave a last batch of one image, which BatchNorm "
              f"cannot train on; it is skipped each epoch")
    save_json(vars(args), os.path.join(args.results_dir, "args.json"), indent=2)
    print(describe(model, config, device))
    return model, optimizer, start_epoch, step, history


def build_model(config, device):
    """The model on `device`, or one line if its sizes do not fit in memory (--hidden-dim 1000000000)."""
    try:
        return MixAndMatchCVAE(config).to(device)
    except (RuntimeError, MemoryError) as e:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory"
        raise SystemExit(f"error: a model with --hidden-dim {config.hidden_dim} and --latent-dim {config.latent_dim} "
                         f"does not fit in memory ({type(e).__name__} while allocating its weights); use smaller sizes")


def describe(model, config, device):
    sampling = "no Sampling" if config.conditioning == "concat" else f"alpha {config.alpha}"
    return (f"{sum(p.numel() for p in model.parameters())} parameters, {device}, {sampling}, {config.conditioning} "
            f"conditioning, {config.decoder} decoder, curriculum step {config.curriculum_step or 'off'}"
            + (f", teacher forcing over {config.teacher_forcing_epochs} epochs" if config.teacher_forcing_epochs
               else "")
            + (f", history dropout {config.history_dropout:g}" if config.history_dropout else "")
            + (f", free bits {config.free_bits:g}" if config.free_bits else ""))


def resume(checkpoint, optimizer, config, device):
    """(first epoch, step, history) of the resumed run, with the optimizer's and the generators'
    states restored, so that it draws what the uninterrupted run would. The CPU generator (the
    shuffle; the Sampling and z on a CPU) is always restored; the GPU's that the run used onto the
    GPU it resumes on, and MPS's onto MPS. Between kinds of device one line says that the draws
    from here on differ from an uninterrupted run's."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = config.lr  # the checkpoint's unless --lr was given
    rng, trained_on = checkpoint["rng"], checkpoint["device"]
    torch.set_rng_state(rng["torch"].cpu())  # it was loaded onto `device`; the CPU's lives on the CPU
    if trained_on.startswith("cuda") and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        if trained_on != str(device):
            print(f"note: the run trained on {trained_on}; its CUDA generator continues on {device}")
    elif trained_on.startswith("mps") and device.type == "mps":
        torch.mps.set_rng_state(rng["mps"].cpu())
    elif trained_on != "cpu" or device.type != "cpu":
        print(f"note: the run trained on {trained_on} and resumes on {device}: the CPU generator's state is "
              f"restored, but the Sampling and z now draw from {device}'s, so the draws from here on differ from an "
              f"uninterrupted run's")
    return checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["history"]


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def is_finite(model):
    """Every weight and BatchNorm statistic finite (one synchronisation per epoch)."""
    return bool(torch.stack([t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]).all())


def stop(e, args, config, epoch, last_checkpoint):
    """End the run on Ctrl-C or SIGTERM (exit 128 + the signal, as shells use), a divergence or an
    OSError (exit 1), in one line on stderr that says how to continue from the last checkpoint."""
    if isinstance(e, Timeout):  # an OSError: first
        sys.exit(f"error: another train.py is writing checkpoints in {args.checkpoint_dir!r}; wait for it to end, "
                 f"or pass another --checkpoint-dir")
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM through raise_keyboard_interrupt
        signum = e.args[0] if e.args else signal.SIGINT
        where = "before training started" if epoch is None else f"in epoch {epoch}"
        code, message = 128 + signum, f"interrupted ({signal.Signals(signum).name}) {where}. "
    elif isinstance(e, FloatingPointError):
        code, message = 1, f"error: {e}. "
    else:  # a full disk, or a folder removed while training; atomic writes leave no half file
        code, message = 1, f"error: {explain_os_error(e)}. "
        if epoch == config.epochs and last_checkpoint == checkpoint_path(args, epoch):  # a figure after it failed
            print(f"{message}Training is complete: {last_checkpoint} holds the last epoch, whole; only "
                  f"{e.filename} is missing.", file=sys.stderr)
            sys.exit(code)
    print(message + how_to_continue(args, config, last_checkpoint, isinstance(e, FloatingPointError)),
          file=sys.stderr)
    sys.exit(code)


def checkpoint_path(args, epoch):
    return os.path.join(args.checkpoint_dir, f"mix_match_{epoch:02d}.pth")


def how_to_continue(args, config, last_checkpoint, diverged):
    """The last complete checkpoint of this run and the command that continues from it (with a
    tenth of the learning rate after a divergence)."""
    lower_lr = ["--lr", f"{config.lr / 10:g}"] if diverged else []
    if last_checkpoint is None:
        return ("No checkpoint of this run is on disk yet; start it again"
                + (f" with a lower learning rate, e.g. {shell_command(lower_lr)}." if diverged else "."))
    words = ["python" if os.name == "nt" else "python3", "train.py", "--resume", last_checkpoint]
    if config.epochs != Config.epochs:
        words += ["--epochs", str(config.epochs)]
    defaults = make_parser()
    for name in ("data_root", "checkpoint_dir", "results_dir", "device", "tf32", "deterministic"):
        value = getattr(args, name)  # not kept in a checkpoint
        if value != defaults.get_default(name):
            words += [f"--{flag(name)}", *([] if value is True else [str(value)])]
    if diverged:
        return (f"The last good checkpoint is {last_checkpoint}; continue from it with a lower learning "
                f"rate: {shell_command(words + lower_lr)}")
    return f"The last complete checkpoint is {last_checkpoint}; continue with: {shell_command(words)}"


if __name__ == "__main__":
    main()
