"""
Train the Mix-and-Match CVAE on MNIST completion with the tutorial's recipe:
BCE (sum) + KL * logistic-annealed weight, Adam lr 1e-4, batch 128, 50 epochs, alpha 64.

    python3 train.py --data-root ./data
"""
import argparse
import itertools
import logging
import math
import os
import signal
import sys
import time
from copy import deepcopy
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from model import CONDITIONINGS, DECODERS, MixAndMatchCVAE, ModelConfig
from utils import (
    TUTORIAL_ALPHA,
    WINDOWS,
    add_device_flags,
    explain_os_error,
    fork_generators,
    free_bits_kl,
    join_image,
    kl_anneal_function,
    load_checkpoint,
    load_mnist,
    loss_terms,
    plot_history,
    positive_float,
    positive_int,
    process_lock,
    save_checkpoint,
    save_image_grid,
    save_json,
    seed,
    set_seed,
    setup_device,
    shell_command,
    signals_deferred,
    split_image,
    writable_dir,
)

# KL annealing (tutorial): the KL weight follows a logistic ramp over training steps,
# 0.007 at step 0, 0.5 at step 2500 (epoch ~5.3 with batch 128), ~1 from step 5000 on
ANNEAL_FUNCTION, ANNEAL_K, ANNEAL_X0 = "logistic", 0.002, 2500
# the recurrent decoder's teacher forcing (paper, section 4): its probability falls linearly from 1
# over this many epochs, then the decoder is fed its own frames: half of a 50-epoch run, so that the
# model trains as long in the regime it generates in as it takes to get there
TEACHER_FORCING_EPOCHS = 25
# the tutorial's values of the flags that --resume takes from the checkpoint when they are not given
TUTORIAL = {"alpha": TUTORIAL_ALPHA, "hidden_dim": ModelConfig.hidden_dim, "latent_dim": ModelConfig.latent_dim,
            "conditioning": ModelConfig.conditioning, "decoder": ModelConfig.decoder, "curriculum_step": 0,
            "history_dropout": 0.0, "free_bits": 0.0, "lr": 1e-4, "batch_size": 128}
# fixed by a checkpoint
MODEL_FLAGS = ("alpha", "hidden_dim", "latent_dim", "conditioning", "decoder", "curriculum_step", "history_dropout",
               "free_bits", "teacher_forcing_epochs")
# results/curves.png is redrawn once this many seconds have passed since its last drawing, and after
# the last epoch: drawn every epoch, matplotlib would take a share of each short epoch (tests/bench_train.py
# times both)
CURVES_EVERY_S = 30


def main():
    parser = make_parser()
    args = parser.parse_args()
    # everything a user can get wrong is checked here, before data is loaded or an epoch trained
    set_seed(args.seed)
    device = setup_device(args)
    model, checkpoint = load_resumable(args.resume, device) if args.resume else (None, None)
    check_flags(parser, args, checkpoint)
    # SIGTERM (a cluster's scheduler, `kill`) stops training like Ctrl-C: between whole files
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    # a second train.py writing into the same folder would interleave its checkpoints with this one's
    with process_lock(os.path.join(args.checkpoint_dir, "train.lock")) as holder:
        if holder:
            raise SystemExit(f"error: another train.py ({holder}) is writing checkpoints in "
                             f"{args.checkpoint_dir!r}; wait for it to end, or pass another --checkpoint-dir")
        fit(parser, args, device, model, checkpoint)


def make_parser():
    """The flags, each with the tutorial's value as its default (TUTORIAL, for the flags a resumed
    run takes from its checkpoint)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=50, help="train until this epoch (default: 50)")
    parser.add_argument("--batch-size", type=positive_int,
                        help=f"at least 2, for BatchNorm (default: {TUTORIAL['batch_size']})")
    parser.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default: {TUTORIAL['lr']:g})")
    parser.add_argument("--alpha", type=int,
                        help=f"Sampling: how many of the hidden_dim indices form I (default: {TUTORIAL['alpha']})")
    parser.add_argument("--hidden-dim", type=positive_int, help=f"(default: {TUTORIAL['hidden_dim']})")
    parser.add_argument("--latent-dim", type=positive_int, help=f"(default: {TUTORIAL['latent_dim']})")
    parser.add_argument("--conditioning", choices=CONDITIONINGS,
                        help="mix-and-match: a random I per pass (the paper's); fixed: I = the first alpha "
                             "indices, the paper's deterministic split; concat: the ordinary CVAE, no Sampling "
                             f"(default: {TUTORIAL['conditioning']})")
    parser.add_argument("--decoder", choices=DECODERS,
                        help="mlp: the tutorial's; autoregressive: each top pixel also sees the pixels before "
                             "it; recurrent: the paper's GRU over image rows, its initial state the fusion "
                             f"(default: {TUTORIAL['decoder']})")
    parser.add_argument("--teacher-forcing-epochs", type=int, metavar="N",
                        help="recurrent decoder: the probability of feeding the true previous row falls "
                             f"linearly from 1 to 0 over N epochs, then it is fed its own; 0 = always the true "
                             f"one (default: {TEACHER_FORCING_EPOCHS} with --decoder recurrent, else 0)")
    parser.add_argument("--history-dropout", type=float, metavar="P",
                        help="autoregressive and recurrent decoders: in training, each previous pixel or row "
                             "they are fed is zeros with probability P (Bowman et al. 2016) "
                             f"(default: {TUTORIAL['history_dropout']:g})")
    parser.add_argument("--free-bits", type=float, metavar="LAMBDA",
                        help="train on max(LAMBDA, KL) per latent unit, the KL averaged over the batch (Kingma "
                             f"et al. 2016), in nats; 0 = the tutorial's loss (default: {TUTORIAL['free_bits']:g})")
    parser.add_argument("--curriculum-step", type=int, metavar="N",
                        help="curriculum of perturbation (paper, section 3.3): stage floor(e / N) at "
                             f"epoch e (from 0); 0 = off, the tutorial (default: {TUTORIAL['curriculum_step']})")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training step (forward, loss and backward; Adam stays eager) with "
                             "torch.compile before the first epoch: faster on a CPU and on a GPU, and it rounds "
                             "differently from the eager run of the same seed (README, Speed) (default: off)")
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--checkpoint-dir", default="checkpoint", help="(default: checkpoint)")
    parser.add_argument("--results-dir", default="results", help="(default: results)")
    add_device_flags(parser)
    parser.add_argument("--seed", type=seed, default=0, help="0 to 2**32 - 1 (default: 0)")
    parser.add_argument("--resume", metavar="PATH",
                        help="continue a run exactly from its checkpoint: the model and loss flags (--alpha, "
                             "sizes, --conditioning, --decoder, --curriculum-step, --teacher-forcing-epochs, "
                             "--history-dropout, --free-bits), and --lr and --batch-size unless given, come "
                             "from it")
    return parser


def check_flags(parser, args, checkpoint):
    """The flags resolved (resolve_run_flags) and checked, and the folders tried, before any work."""
    resolve_run_flags(args, checkpoint)
    if not 0 <= args.alpha <= args.hidden_dim:
        parser.error(f"--alpha must be in 0..{args.hidden_dim} (--hidden-dim), got {args.alpha}")
    if args.curriculum_step < 0 or (args.curriculum_step and args.conditioning != "mix-and-match"):
        parser.error("--curriculum-step must be >= 0, and 0 unless --conditioning mix-and-match")
    if args.teacher_forcing_epochs < 0 or (args.teacher_forcing_epochs and args.decoder != "recurrent"):
        parser.error("--teacher-forcing-epochs must be >= 0, and 0 unless --decoder recurrent")
    if not 0 <= args.history_dropout < 1 or (args.history_dropout and args.decoder == "mlp"):
        parser.error(f"--history-dropout must be in [0, 1), and 0 with the mlp decoder, which is fed no history; "
                     f"got {args.history_dropout:g} with --decoder {args.decoder}")
    if not 0 <= args.free_bits < math.inf:
        parser.error(f"--free-bits must be a number of nats >= 0, got {args.free_bits:g}")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2: BatchNorm cannot normalise a batch of one image")
    if checkpoint and checkpoint["epoch"] >= args.epochs:
        raise SystemExit(f"error: {args.resume} is already at epoch {checkpoint['epoch']}, and --epochs is "
                         f"{args.epochs}: nothing left to train. Pass --epochs with a larger number.")
    writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    writable_dir(args.results_dir, "--results-dir")


def fit(parser, args, device, model, checkpoint):
    """Train from scratch or on from the checkpoint to --epochs, each epoch's files written whole;
    Ctrl-C, SIGTERM, a divergence or a full disk end in one line that says how to continue."""
    epoch, last_checkpoint = None, args.resume  # for the messages below
    try:
        train_images, _ = load_mnist(args.data_root, train=True, device=device)
        test_images, _ = load_mnist(args.data_root, train=False, device=device)
        if checkpoint:
            start_epoch, step, history = checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["history"]
        else:
            config = ModelConfig(hidden_dim=args.hidden_dim, latent_dim=args.latent_dim,
                                 conditioning=args.conditioning, decoder=args.decoder,
                                 history_dropout=args.history_dropout)
            model, start_epoch, step, history = build_model(config, device), 1, 0, []
        # fused: one kernel updates all parameters; the default per-parameter loop costs more than
        # this small model's arithmetic on a CPU (tests/bench_train.py)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
        if checkpoint:
            restore_training_state(checkpoint, optimizer, args.lr, device)
            print(f"resuming {args.resume} after epoch {checkpoint['epoch']} (step {step})")
        if len(train_images) % args.batch_size == 1:
            print(f"note: {len(train_images)} training images leave a last batch of one image, which BatchNorm "
                  f"cannot train on; it is skipped each epoch")

        step_loss = compiled_batch_loss(model, train_images, args, start_epoch) if args.compile else batch_loss
        save_json(vars(args), os.path.join(args.results_dir, "args.json"), indent=2)
        sampling = "no Sampling" if args.conditioning == "concat" else f"alpha {args.alpha}"
        print(f"{sum(p.numel() for p in model.parameters())} parameters, {device}, {sampling}, {args.conditioning} "
              f"conditioning, {args.decoder} decoder, curriculum step {args.curriculum_step or 'off'}"
              + (f", teacher forcing over {args.teacher_forcing_epochs} epochs"
                 if args.teacher_forcing_epochs else "")
              + (f", history dropout {args.history_dropout:g}" if args.history_dropout else "")
              + (f", free bits {args.free_bits:g}" if args.free_bits else ""))
        curves_drawn = time.time()
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.time()
            stage = curriculum_stage(epoch, args.curriculum_step, args.alpha, args.hidden_dim)
            teacher_forcing = teacher_forcing_probability(epoch, args.teacher_forcing_epochs)
            rec, kl, step = train_epoch(model, optimizer, train_images, args.batch_size, args.alpha, step, stage,
                                        teacher_forcing, args.free_bits, step_loss)
            test_loss = evaluate(model, test_images, args.alpha)  # with the Sampling used at test time
            if not all(map(math.isfinite, (rec, kl, test_loss))) or not is_finite(model):
                stop(1, f"error: training diverged in epoch {epoch} (train BCE {rec:.4g}, KL {kl:.4g}, test loss "
                        f"{test_loss:.4g}); no checkpoint was written for it. "
                        + how_to_continue(parser, args, last_checkpoint, diverged=True))
            record = {"epoch": epoch, "train_rec": rec, "train_kl": kl, "kl_weight": anneal_weight(step),
                      "test_loss": test_loss, "curriculum_stage": stage, "teacher_forcing": teacher_forcing,
                      "seconds": time.time() - t0}
            history.append(record)
            with signals_deferred():  # Ctrl-C waits for this epoch's files, so that the message can name them
                save_reconstructions(model, test_images[:100], args.alpha,
                                     os.path.join(args.results_dir, f"rec_{epoch:02d}.png"))
                path = checkpoint_path(args, epoch)
                save_checkpoint(path, model, optimizer, args.alpha, epoch, step, args,
                                curriculum_step=args.curriculum_step, history=history)
                last_checkpoint = path
                save_json(history, os.path.join(args.results_dir, "history.json"))
                if epoch == args.epochs or time.time() - curves_drawn >= CURVES_EVERY_S:
                    plot_history({args.conditioning: history}, os.path.join(args.results_dir, "curves.png"))
                    curves_drawn = time.time()
            print(f"epoch {epoch:2d} | rec {rec:7.2f} | kl {kl:6.2f} | kl weight {record['kl_weight']:.3f} "
                  f"| test loss {test_loss:7.2f} | {record['seconds']:5.1f} s"
                  + ("" if stage is None else f" | curriculum stage {stage}")
                  + (f" | teacher forcing {teacher_forcing:.2f}" if args.teacher_forcing_epochs else ""),
                  flush=True)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through raise_keyboard_interrupt
        signum = e.args[0] if e.args else signal.SIGINT
        where = "before training started" if epoch is None else f"in epoch {epoch}"
        stop(128 + signum, f"interrupted ({signal.Signals(signum).name}) {where}. "
                           f"{how_to_continue(parser, args, last_checkpoint)}")
    except OSError as e:  # a full disk, or a folder removed while training; atomic writes leave no half file
        # only a figure, after the last checkpoint, failed
        if epoch == args.epochs and last_checkpoint == checkpoint_path(args, epoch):
            stop(1, f"error: {explain_os_error(e)}. Training is complete: {last_checkpoint} holds the last "
                    f"epoch, whole; only {e.filename} is missing.")
        stop(1, f"error: {explain_os_error(e)}. {how_to_continue(parser, args, last_checkpoint)}")


def checkpoint_path(args, epoch):
    return os.path.join(args.checkpoint_dir, f"mix_match_{epoch:02d}.pth")


def load_resumable(path, device):
    """(model, checkpoint) to resume from; a file of weights only (the tutorial's) cannot be."""
    model, checkpoint = load_checkpoint(path, device)
    if "optimizer" not in checkpoint:
        raise SystemExit(f"error: {path!r} holds model weights only (no optimizer state); "
                         f"--resume needs a checkpoint written by train.py")
    missing = [key for key in ("epoch", "step", "curriculum_step", "history", "rng", "args") if key not in checkpoint]
    if missing:
        raise SystemExit(f"error: {path!r} has no {', '.join(missing)}: it was written by another program or "
                         f"edited; --resume needs a checkpoint written by train.py")
    return model, checkpoint


def build_model(config, device):
    """The model on `device`, or one line if its sizes do not fit in memory (--hidden-dim 1000000000)."""
    try:
        return MixAndMatchCVAE(config).to(device)
    except (RuntimeError, MemoryError) as e:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory"
        raise SystemExit(f"error: a model with --hidden-dim {config.hidden_dim} and --latent-dim {config.latent_dim} "
                         f"does not fit in memory ({type(e).__name__} while allocating its weights); use smaller sizes")


def resolve_run_flags(args, checkpoint):
    """Fill the flags left out: from the checkpoint on --resume, else the tutorial's values. A
    model flag given on the command line must agree with the checkpoint, which fixes the model;
    --lr and --batch-size may change."""
    saved = {}
    if checkpoint:
        # through ModelConfig: a checkpoint from before --decoder existed gets its default, the MLP;
        # one from before --free-bits and --teacher-forcing-epochs trained without them
        kept_in_args = ("lr", "batch_size", "free_bits", "teacher_forcing_epochs")
        saved = {**asdict(ModelConfig(**checkpoint["config"])), "alpha": checkpoint["alpha"],
                 "curriculum_step": checkpoint["curriculum_step"], "teacher_forcing_epochs": 0, "free_bits": 0.0,
                 **{name: checkpoint["args"][name] for name in kept_in_args if name in checkpoint["args"]}}
    contradictions = [f"--{name.replace('_', '-')} {getattr(args, name)} (the checkpoint has {saved[name]})"
                      for name in MODEL_FLAGS if checkpoint and getattr(args, name) not in (None, saved[name])]
    if contradictions:
        raise SystemExit(f"error: {', '.join(contradictions)}: a resumed run keeps its checkpoint's model and loss. "
                         f"Leave these flags out, or start a new run without --resume.")
    for name, default in TUTORIAL.items():
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, default))
    if args.teacher_forcing_epochs is None:  # the paper's schedule where there is a recurrent decoder to feed
        args.teacher_forcing_epochs = saved.get("teacher_forcing_epochs",
                                                TEACHER_FORCING_EPOCHS if args.decoder == "recurrent" else 0)


def how_to_continue(parser, args, last_checkpoint, diverged=False):
    """The last complete checkpoint of this run and the command that continues from it (with a
    tenth of the learning rate after a divergence)."""
    lower_lr = ["--lr", f"{args.lr / 10:g}"] if diverged else []
    if last_checkpoint is None:
        return ("No checkpoint of this run is on disk yet; start it again"
                + (f" with a lower learning rate, e.g. {shell_command(lower_lr)}." if diverged else "."))
    words = ["python" if WINDOWS else "python3", "train.py", "--resume", last_checkpoint]
    for name in ("epochs", "data_root", "checkpoint_dir", "results_dir", "device", "tf32", "deterministic", "compile"):
        value = getattr(args, name)  # not kept in a checkpoint
        if value != parser.get_default(name):
            words += [f"--{name.replace('_', '-')}", *([] if value is True else [str(value)])]
    if diverged:
        return (f"The last good checkpoint is {last_checkpoint}; continue from it with a lower learning "
                f"rate: {shell_command(words + lower_lr)}")
    return f"The last complete checkpoint is {last_checkpoint}; continue with: {shell_command(words)}"


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def stop(code, message):
    """End the run with one message on stderr and the exit code (130 after Ctrl-C, as shells use)."""
    print(message, file=sys.stderr)
    sys.exit(code)


def is_finite(model):
    """Every weight and BatchNorm statistic finite (one synchronisation per epoch)."""
    return bool(torch.stack([t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]).all())


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


def teacher_forcing_probability(epoch, teacher_forcing_epochs):
    """The recurrent decoder's probability of being fed the true previous row in epoch e (from 1):
    1 at the first epoch, falling linearly to 0 at epoch N + 1 (paper, section 4); always 1 with N = 0."""
    if teacher_forcing_epochs == 0:
        return 1.0
    return max(0.0, 1 - (epoch - 1) / teacher_forcing_epochs)


def batch_loss(model, data, condition, alpha, sampled_indices, kl_weight, free_bits):
    """The training loss of one batch for one Sampling I, BCE + kl_weight * KL (free bits, where
    asked, in place of the KL), with the two terms; what --compile compiles."""
    reconstruction, mu, logvar = model(data, condition, alpha, sampled_indices)
    bce, kl = loss_terms(reconstruction, data, mu, logvar)
    objective = free_bits_kl(mu, logvar, free_bits) if free_bits else kl
    return bce + kl_weight * objective, bce, kl


def compiled_batch_loss(model, images, args, start_epoch, mode="default"):
    """batch_loss compiled (--compile), and compiled here, before the first epoch, for each case
    the run will meet: each batch size (the last batch may be smaller) and the recurrent decoder's
    teacher forcing, whole or scheduled. The KL weight, the Sampling and the scheduled probability
    (the decoder's buffer) reach it as tensors, so no epoch recompiles (tests/test_compile.py counts
    the graphs). It compiles on a copy of the model with the generators forked, so that the run
    draws and trains what it would have; a platform that cannot compile ends here, in one line.
    `mode` is torch.compile's; tests/bench_train.py also tries "reduce-overhead" (CUDA graphs)."""
    import torch._dynamo
    import torch._inductor

    torch._dynamo.config.allow_rnn = True  # the recurrent decoder's GRU inside the graph, not a break in it
    # Inductor imports cpp_extension, whose "No CUDA runtime is found" means nothing to a CPU run
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # fallback_random: torch's own random draws, so that a seed draws what it draws eagerly
    options = {**torch._inductor.list_mode_options(mode), "fallback_random": True}
    compiled = torch.compile(batch_loss, fullgraph=True, dynamic=False, options=options)
    sizes = sorted({min(args.batch_size, len(images)), len(images) % args.batch_size} - {0, 1}, reverse=True)
    forcings = sorted({teacher_forcing_probability(epoch, args.teacher_forcing_epochs) == 1
                       for epoch in range(start_epoch, args.epochs + 1)})
    t0, graphs = time.time(), torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        with fork_generators(images.device):
            copy = deepcopy(model).train()
            for size, whole in itertools.product(sizes, forcings):
                data, condition = split_image(images[:size])
                if args.decoder == "recurrent":
                    copy.recurrent_decoder.set_teacher_forcing(1.0 if whole else 0.5)
                loss = compiled(copy, data, condition, args.alpha, copy.sampling(args.alpha)[0],
                                torch.tensor(0.5, device=images.device), args.free_bits)[0]
                loss.backward()
    except Exception as e:  # noqa: BLE001 (Inductor's errors have no common type; each means: this platform cannot)
        detail = (str(e).strip().splitlines() or ["no detail"])[0][:300]  # the rest is torch's advice on debugging
        raise SystemExit(f"error: --compile cannot compile the training step here ({type(e).__name__}: {detail}); "
                         f"train without --compile")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    cases = f"batches of {' and '.join(map(str, sizes))}"
    if args.decoder == "recurrent":
        cases += f", teacher forcing {' and '.join('whole' if whole else 'scheduled' for whole in forcings)}"
    print(f"compiled the training step in {time.time() - t0:.0f} s: {graphs} graph(s), for {cases}", flush=True)
    return compiled


def train_epoch(model, optimizer, images, batch_size, alpha, step, curriculum_stage=None, teacher_forcing=1.0,
                free_bits=0.0, step_loss=batch_loss):
    """One pass over the training images in shuffled batches of batch_size, the last partial one
    kept unless it holds a single image (BatchNorm cannot train on it); returns (BCE per image,
    KL per image, step). The KL returned is the true one, also when free bits changes the loss.
    step_loss is batch_loss, or batch_loss compiled (--compile, compiled_batch_loss)."""
    model.train()
    # the epoch's place in the schedules, set as model.train() is: the Sampling's curriculum stage,
    # and the recurrent decoder's teacher forcing
    model.curriculum_stage = curriculum_stage
    if model.config.decoder == "recurrent":
        model.recurrent_decoder.set_teacher_forcing(teacher_forcing)
    rec_sum = kl_sum = 0.0
    trained = 0
    # a DataLoader over the indices shuffles with the same generator draws as the tutorial's
    # DataLoader over the images, so a seed gives the tutorial's batches; the images themselves
    # are sliced from one tensor. It draws from torch's generator before its first batch only, so
    # the epoch's whole order is taken at once and sent to the images' device in one copy, where a
    # copy of each batch's indices would make the CPU wait for the GPU at every step
    order = to_device(torch.cat(list(DataLoader(range(len(images)), batch_size=batch_size, shuffle=True))), images)
    # only a last batch can hold a single image: fit() has said it is skipped
    batches = [indices for indices in order.split(batch_size) if len(indices) > 1]
    # the KL weight is annealed per step, not per epoch: the epoch's weights reach the steps as one
    # tensor, in one copy, data that a compiled step reads where a number would be compiled in
    kl_weights = to_device(torch.tensor([anneal_weight(s) for s in range(step, step + len(batches))]), images)
    for indices, kl_weight in zip(batches, kl_weights):
        data, condition = split_image(images.index_select(0, indices))  # faster than images[indices]
        sampled_indices, _ = model.sampling(alpha)  # drawn as forward would, first
        loss, bce, kl = step_loss(model, data, condition, alpha, sampled_indices, kl_weight, free_bits)
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


def restore_training_state(checkpoint, optimizer, lr, device):
    """Optimizer and RNG state, so that a resumed run draws what the uninterrupted one would. The
    CPU generator (the shuffle; the Sampling and z on a CPU) is always restored; the CUDA generator
    of the GPU the run used (the Sampling and z on a GPU) onto the GPU it resumes on, and MPS's onto
    MPS. Between kinds of device one line says that the draws from here on differ from an
    uninterrupted run's."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr  # the checkpoint's unless --lr was given (resolve_run_flags)
    torch.set_rng_state(checkpoint["rng"]["torch"].cpu())  # it was loaded onto `device`; the CPU's lives on the CPU
    state = checkpoint["rng"]["cuda"]
    if isinstance(state, list):  # an older checkpoint: every GPU's state, and not which one the run used
        trained_on = "cpu" if not state else "an unrecorded GPU"
        state = None
    else:
        trained_on = checkpoint.get("device", "cpu")
    if trained_on.startswith("cuda") and device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
        if trained_on != str(device):
            print(f"note: the run trained on {trained_on}; its CUDA generator continues on {device}")
    elif trained_on.startswith("mps") and device.type == "mps" and "mps" in checkpoint["rng"]:
        torch.mps.set_rng_state(checkpoint["rng"]["mps"].cpu())
    elif trained_on != "cpu" or device.type != "cpu":
        print(f"note: the run trained on {trained_on} and resumes on {device}: the CPU generator's state is "
              f"restored, but the Sampling and z now draw from {device}'s, so the draws from here on differ from an "
              f"uninterrupted run's")


if __name__ == "__main__":
    main()
