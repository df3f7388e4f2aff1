"""
The Mix-and-Match CVAE (Aliakbarian et al., "A Stochastic Conditioning Scheme for Diverse Human
Motion Prediction", CVPR 2020), on the tutorial's task: complete the top of an MNIST digit
(the data, pixels 0..499) from its bottom (the condition, pixels 500..783).

The condition is not concatenated to the data or the latent: on every forward pass, Sampling
picks a random set I of `alpha` indices out of `hidden_dim`, and Resampling builds each hidden
vector from two sources, one at I and the other at the complement. The layer names match the
tutorial's, so its published state_dict loads with strict=True.

Options exist to test the paper's claim (samples/README.md, "Does Mix-and-Match keep the latent in
use?"): the ordinary concatenating CVAE (`conditioning="concat"`), and two decoders expressive
enough to do without the latent (DECODERS, at the end): one autoregressive over pixels, and the
paper's own, a GRU over image rows whose initial state is the fusion.
"""
import math
from dataclasses import dataclass, fields

import torch
from torch import nn

SPLIT = 500  # pixels 0..499 are the data to complete, 500..783 the condition (the digit's bottom)
CONDITIONINGS = ("mix-and-match", "fixed", "concat")
KINDS = {int: "a whole number", float: "a number", str: "a name"}  # a setting's type, as check() names it
FRAME = 28  # one image row: a frame of the recurrent decoder, as a pose is one of the paper's


@dataclass
class Config:
    """A run's settings, each default the tutorial's: the model's, then the training recipe's.
    train.py makes a flag of each field after output_dim, a checkpoint stores them all, and
    check() says in one ValueError what a value that means nothing should be."""
    input_dim: int = 500  # data: the top of the image (pixels 0..499)
    condition_dim: int = 284  # condition: the bottom (pixels 500..783)
    output_dim: int = 500  # the decoder completes the top
    hidden_dim: int = 128
    latent_dim: int = 32
    # "mix-and-match": a fresh random I per pass (the tutorial, the paper's method); "fixed": I is
    # always the first alpha indices, the paper's deterministic split (its Table 1 baseline);
    # "concat": no Sampling, the two representations side by side, the ordinary CVAE
    conditioning: str = "mix-and-match"
    decoder: str = "mlp"  # a name in DECODERS
    # history dropout (Bowman et al. 2016, "word dropout"): in training, each previous pixel or
    # frame a decoder fed history is given is zeros with this probability
    history_dropout: float = 0.0
    # a scheduled decoder's teacher forcing falls from 1 to 0 over this many epochs (paper,
    # section 4); None: the decoder's own default
    teacher_forcing_epochs: int = None
    alpha: int = 64  # Sampling: how many of the hidden_dim indices form I
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-4
    # curriculum of perturbation (paper, section 3.3): stage floor(e / N) at epoch e (from 0); 0: off
    curriculum_step: int = 0
    # free bits (Kingma et al. 2016): max(free_bits, KL) per latent unit in nats; 0: the tutorial's loss
    free_bits: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.teacher_forcing_epochs is None and self.decoder in DECODERS:
            self.teacher_forcing_epochs = DECODERS[self.decoder].teacher_forcing_epochs

    def check(self, recipe=True):
        """The settings themselves, or a ValueError naming the flag and what it must be; the
        model's alone without `recipe` (a model takes its alpha at each call)."""
        if self.decoder not in DECODERS:  # first: its default teacher forcing is unknown
            raise ValueError(f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        counts = ("input_dim", "condition_dim", "output_dim", "hidden_dim", "latent_dim", "epochs")
        for f in fields(self):  # the types first: a checkpoint may hold anything
            value, types = getattr(self, f.name), (int, float) if f.type is float else f.type
            if not isinstance(value, types) or isinstance(value, bool) or (f.name in counts and value < 1):
                expected = "a whole number >= 1" if f.name in counts else KINDS[f.type]
                raise ValueError(f"--{flag(f.name)} must be {expected}, got {value!r}")
        scheduled = [name for name, decoder in DECODERS.items() if decoder.teacher_forcing_epochs]
        fed = [name for name, decoder in DECODERS.items() if decoder.fed_history]
        checks = [
            (self.conditioning in CONDITIONINGS, "conditioning", f"one of {', '.join(CONDITIONINGS)}"),
            (0 <= self.history_dropout < 1 and (not self.history_dropout or self.decoder in fed),
             "history_dropout", f"in [0, 1), and 0 unless --decoder {' or '.join(fed)} (the others are fed no "
                                f"history)"),
            (self.teacher_forcing_epochs >= 0 and (not self.teacher_forcing_epochs or self.decoder in scheduled),
             "teacher_forcing_epochs", f">= 0, and 0 unless --decoder {' or '.join(scheduled)}"),
            (0 <= self.alpha <= self.hidden_dim, "alpha", f"in 0..{self.hidden_dim} (--hidden-dim)"),
            (self.batch_size >= 2, "batch_size", "at least 2: BatchNorm cannot normalise a batch of one image"),
            (0 < self.lr < math.inf, "lr", "a finite number > 0"),
            (self.curriculum_step >= 0 and (not self.curriculum_step or self.conditioning == "mix-and-match"),
             "curriculum_step", ">= 0, and 0 unless --conditioning mix-and-match"),
            (0 <= self.free_bits < math.inf, "free_bits", "a number of nats >= 0"),
            (0 <= self.seed < 2 ** 32, "seed", f"a whole number from 0 to {2 ** 32 - 1}"),
        ]
        names = [f.name for f in fields(self)]
        model = names[:names.index("alpha")]  # the model's settings come first, the recipe's from alpha on
        for ok, name, expected in checks:
            if not ok and (recipe or name in model):
                raise ValueError(f"--{flag(name)} must be {expected}, got {getattr(self, name)!r}"
                                 + (f" with --decoder {self.decoder}" if name == "history_dropout" else ""))
        return self


def flag(name):
    return name.replace("_", "-")


def split_image(images):
    """(..., 784) images -> data (..., 500): the top to complete, condition (..., 284): the bottom."""
    return images[..., :SPLIT], images[..., SPLIT:]


def join_image(top, bottom):
    """Put a completed top (..., 500) back on its bottom (..., 284): (..., 784) images."""
    return torch.cat([top, bottom], dim=-1)


def _encoder(in_dim, hidden_dim):
    # Linear -> BatchNorm1d -> ReLU twice, halving first (tutorial: 500 -> 250 -> 128)
    return nn.Sequential(
        nn.Linear(in_dim, in_dim // 2), nn.BatchNorm1d(in_dim // 2), nn.ReLU(),
        nn.Linear(in_dim // 2, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
    )


class MixAndMatchCVAE(nn.Module):

    def __init__(self, config=None):
        super().__init__()
        self.config = config = (config or Config()).check(recipe=False)
        # concatenation keeps both representations whole, so the layers after it are twice as wide
        fused_dim = 2 * config.hidden_dim if config.conditioning == "concat" else config.hidden_dim
        self.data_encoder = _encoder(config.input_dim, config.hidden_dim)
        self.condition_encoder = _encoder(config.condition_dim, config.hidden_dim)
        # posterior q(z | data, condition); `std` holds the log-variance, as in the tutorial
        self.mean = nn.Linear(fused_dim, config.latent_dim)
        self.std = nn.Linear(fused_dim, config.latent_dim)
        # lifts z to hidden_dim so that Resampling can mix it with the condition
        self.decode_latent = nn.Sequential(nn.Linear(config.latent_dim, config.hidden_dim), nn.ReLU())
        self.data_decoder = DECODERS[config.decoder](fused_dim, config)  # the tutorial's name, for every decoder
        # the curriculum of perturbation's stage in training (paper, section 3.3), which schedule() sets
        # each epoch; None: the tutorial's Sampling, as at test time
        self.curriculum_stage = None

    def schedule(self, epoch):
        """Set the training schedules at epoch e (from 1), as train.py sets model.train(): the
        Sampling's curriculum stage and the decoder's teacher forcing; returns both, for the history."""
        self.curriculum_stage = curriculum_stage(epoch, self.config)
        return {"curriculum_stage": self.curriculum_stage, "teacher_forcing": self.data_decoder.schedule(epoch)}

    def sampling(self, alpha):
        """Sampling (tutorial step 3): a random set I of `alpha` distinct indices out of hidden_dim,
        and its complement Ī. Drawn from torch's generator, so torch.manual_seed fixes a run. In
        training at a curriculum stage, and always with "fixed" conditioning (stage 0), I is drawn
        from part of the hidden vector only (curriculum_order)."""
        hidden_dim = self.config.hidden_dim
        if not 0 <= alpha <= hidden_dim:
            raise ValueError(f"alpha must be in 0..{hidden_dim} (a count of hidden units), got {alpha}")
        device = self.mean.weight.device
        if self.config.conditioning == "concat":
            return None, None  # the ordinary CVAE draws nothing
        stage = 0 if self.config.conditioning == "fixed" else self.curriculum_stage if self.training else None
        if stage is None:
            order = torch.randperm(hidden_dim, device=device)
        else:
            order = curriculum_order(alpha, hidden_dim, stage, device)
        return order[:alpha], order[alpha:]  # sampled_indices I, complementary_indices Ī

    @staticmethod
    def resampling(at_sampled, at_complementary, sampled_indices):
        """Resampling (tutorial step 4): a hidden vector whose entries I come from the first
        source and whose entries Ī, the rest, from the second."""
        # the mask is made on the sources' device: index_fill_ takes True as a number, where
        # is_sampled[sampled_indices] = True would copy a CPU tensor to the GPU, a wait per call
        is_sampled = torch.zeros(at_sampled.shape[1], dtype=torch.bool, device=at_sampled.device).index_fill_(
            0, sampled_indices, True)
        # one select, forward and backward, gives what the tutorial's zeros tensor plus two
        # indexed assignments gives, at a fraction of the cost (tests/bench_train.py)
        return torch.where(is_sampled, at_sampled, at_complementary)  # (B, hidden_dim)

    def combine(self, at_sampled, at_complementary, sampled_indices):
        """Resampling, or for the ordinary CVAE ("concat") both sources side by side."""
        if self.config.conditioning == "concat":
            return torch.cat([at_sampled, at_complementary], dim=1)  # (B, 2 * hidden_dim)
        return self.resampling(at_sampled, at_complementary, sampled_indices)  # (B, hidden_dim)

    def encode(self, data, condition_h, sampled_indices):
        # the encoder sees the data at I and the condition at the complement Ī
        fused = self.combine(self.data_encoder(data), condition_h, sampled_indices)
        return self.mean(fused), self.std(fused)  # mu, logvar: (B, latent_dim) each

    @staticmethod
    def reparameterize(mu, logvar):
        # z = mu + sigma * eps keeps the sampling differentiable in mu and logvar
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z, condition_h, sampled_indices, data=None, condition=None):
        """Pixel probabilities of the top, (B, output_dim). The expressive decoders are teacher-forced
        with the true top `data` (training, likelihoods) and generate their own without it; the MLP
        decoder needs no top, and the recurrent one also reads the `condition`'s pixels next to it."""
        # the decoder sees the condition at I and the lifted latent at the complement Ī
        fused = self.combine(condition_h, self.decode_latent(z), sampled_indices)
        return self.data_decoder(fused, condition, data)

    def forward(self, data, condition, alpha):
        """One Sampling shared by encoder and decoder; returns (reconstruction, mu, logvar), the
        expressive decoders' teacher-forced with `data`."""
        self._check_width(data, self.config.input_dim, "data")
        self._check_width(condition, self.config.condition_dim, "condition")
        sampled_indices, _ = self.sampling(alpha)
        # one condition representation feeds both Resamplings (and updates BatchNorm once a step)
        condition_h = self.condition_encoder(condition)  # (B, hidden_dim)
        mu, logvar = self.encode(data, condition_h, sampled_indices)
        z = self.reparameterize(mu, logvar)
        return self.decode(z, condition_h, sampled_indices, data, condition), mu, logvar

    @torch.no_grad()
    def sample(self, condition, alpha, z=None, temperature=1.0, sampled_indices=None):
        """Completions for each condition row, with z ~ N(0, temperature^2 I) unless given: the prior
        at temperature 1, the tutorial's; lower trades diversity for typical completions. A fresh
        Sampling unless sampled_indices are given (sample.py holds one fixed to measure z alone)."""
        self._check_width(condition, self.config.condition_dim, "condition")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if z is None:
            z = temperature * torch.randn(condition.shape[0], self.config.latent_dim, device=condition.device)
        self._check_width(z, self.config.latent_dim, "z")
        if sampled_indices is None:
            sampled_indices = self.sampling(alpha)[0]
        return self.decode(z, self.condition_encoder(condition), sampled_indices, condition=condition)

    @staticmethod
    def _check_width(x, width, name):
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must have shape (batch, {width}), got {tuple(x.shape)}")


def curriculum_stage(epoch, config):
    """Curriculum learning of perturbation (paper, section 3.3): at epoch e (counted from 0),
    s = floor(e / N) of the alpha indices are drawn at random, the rest taken from a fixed known
    part, until s reaches min(alpha, hidden_dim - alpha) / 2; None then (and with N = 0) means
    all alpha are drawn from the whole hidden vector, as at test time."""
    if config.curriculum_step == 0:
        return None
    stage = (epoch - 1) // config.curriculum_step
    return stage if stage < min(config.alpha / 2, (config.hidden_dim - config.alpha) / 2) else None


def curriculum_order(alpha, hidden_dim, stage, device):
    """The hidden indices in the order Sampling takes I from at a curriculum stage s (paper, section
    3.3): the first alpha - s of the known part (the first alpha indices), s drawn from the rest,
    then the others. Stage 0 is the fixed split; "fixed" conditioning is always at it."""
    if not 0 <= stage <= min(alpha, hidden_dim - alpha):
        raise ValueError(f"curriculum_stage must be in 0..{min(alpha, hidden_dim - alpha)}, got {stage}")
    known, rest = torch.arange(alpha, device=device), alpha + torch.randperm(hidden_dim - alpha, device=device)
    kept = alpha - stage  # known indices that stay in I at this stage
    return torch.cat([known[:kept], rest[:stage], known[kept:], rest[stage:]])


# -----------------------------------------------------------------------------
# the loss (tutorial step 8): BCE (sum) of the completed pixels, plus the KL

def kl_per_unit(mu, logvar):
    """(B, latent_dim): KL(q(z|x,c) || N(0, I)) of each latent unit = -0.5 * (1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu, logvar):
    """Per image (B,): the KL summed over the latent units."""
    return kl_per_unit(mu, logvar).sum(1)


def loss_terms(reconstruction, data, mu, logvar):
    """The two ELBO terms, summed over the batch: BCE of the completed pixels, and KL."""
    return BinaryCrossEntropySum.apply(reconstruction, data), kl_divergence(mu, logvar).sum()


class BinaryCrossEntropySum(torch.autograd.Function):
    """F.binary_cross_entropy(probabilities, target, reduction="sum"), the tutorial's BCE, with the
    forward written as whole-tensor operations: on a CPU torch's own calls log1p one element at a
    time, 3 to 4 times slower. The backward is torch's own, so the gradients, and with them
    training, are bit-identical; the loss agrees to float rounding (log(1 - p), not log1p(-p))."""

    @staticmethod
    def forward(ctx, probabilities, target):
        ctx.save_for_backward(probabilities, target)
        # like torch, each log is clamped at -100, so a saturated pixel costs 100 nats, not inf
        log_p = probabilities.log().clamp_min_(-100)
        log_1mp = (1 - probabilities).log_().clamp_min_(-100)
        return -torch.lerp(log_1mp, log_p, target).sum()  # lerp: t log p + (1 - t) log(1 - p)

    @staticmethod
    def backward(ctx, grad):
        probabilities, target = ctx.saved_tensors
        reduction_sum = 2  # torch's enum for reduction="sum"
        return torch.ops.aten.binary_cross_entropy_backward(grad, probabilities, target, None, reduction_sum), None


def free_bits_kl(mu, logvar, free_bits):
    """Free bits (Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow",
    NeurIPS 2016, appendix): sum_u max(free_bits, mean_batch KL_u), times the batch size to sum over
    it as loss_terms does. Below free_bits a unit's KL has no gradient: nothing is gained by pushing
    it lower, so the optimiser need not give the unit up."""
    return len(mu) * kl_per_unit(mu, logvar).mean(0).clamp_min(free_bits).sum()


# -----------------------------------------------------------------------------
# the decoders: config.decoder names one in DECODERS; each is called decoder(fused, condition, data)

class Decoder:
    """What a decoder says of itself: whether it is fed history (Config.check: history dropout means
    nothing otherwise), its default teacher_forcing_epochs (0: no schedule), and its teacher forcing
    at an epoch in training (1: the true history, always)."""
    fed_history, teacher_forcing_epochs = False, 0

    def schedule(self, epoch):
        return 1.0


class MLPDecoder(Decoder, nn.Sequential):
    """The tutorial's decoder: Linear -> BatchNorm1d -> ReLU, then the pixel probabilities (128 ->
    128 -> 500), every pixel independent given the fusion; its layers keep the tutorial's names."""

    def __init__(self, fused_dim, config):
        super().__init__(nn.Linear(fused_dim, config.hidden_dim), nn.BatchNorm1d(config.hidden_dim), nn.ReLU(),
                         nn.Linear(config.hidden_dim, config.output_dim), nn.Sigmoid())

    def forward(self, fused, condition=None, data=None):
        return self[-1](self.logits(fused))  # (B, output_dim)

    def logits(self, fused):
        """Before the Sigmoid: what the autoregressive decoder adds the history's terms to."""
        for layer in list(self)[:-1]:
            fused = layer(fused)
        return fused


class AutoregressiveDecoder(Decoder, nn.Module):
    """The tutorial's decoder (`mlp`) with each top pixel also conditioned on the pixels before it
    in raster order: logit of pixel i += sum over j < i of W_ij * pixel j, a strictly
    lower-triangular linear map (a fully visible sigmoid belief net, Neal 1992, on top of the
    decoder). It sees the stroke so far, the pixel to the left and the one a row up, which is what
    the MLP decoder can only get through z; one masked matmul when teacher-forced, O(pixels^2)
    multiply-adds to generate a top."""
    fed_history = True

    def __init__(self, fused_dim, config):
        super().__init__()
        self.mlp = MLPDecoder(fused_dim, config)
        self.history_dropout = config.history_dropout
        self.previous_pixels = nn.Linear(config.output_dim, config.output_dim, bias=False)
        self.register_buffer("causal_mask", torch.ones(config.output_dim, config.output_dim).tril(-1),
                             persistent=False)
        with torch.no_grad():
            self.previous_pixels.weight.mul_(self.causal_mask)  # the entries never used stay zero

    def forward(self, fused, condition=None, data=None):
        """(B, output_dim) probabilities: teacher-forced with the true top `data`, else generated."""
        logits = self.mlp.logits(fused)  # (B, output_dim)
        weight = self.previous_pixels.weight * self.causal_mask  # no gradient reaches pixel i or later
        if data is not None:
            history = drop_history(data, self.history_dropout) if self.training else data
            return torch.sigmoid(logits + history @ weight.T)  # every pixel from the true ones before it
        return self.generate(logits, weight)

    @staticmethod
    def generate(logits, weight):
        """The top, pixel by pixel in raster order, each pixel fed back as its own probability, so
        that z and the Sampling fix the completion (as a motion decoder's noise fixes its future).
        Each new pixel adds its term to every later logit."""
        logits, top = logits.clone(), torch.empty_like(logits)
        for i in range(logits.shape[1]):
            top[:, i] = torch.sigmoid(logits[:, i])
            logits[:, i + 1:].addr_(top[:, i], weight[i + 1:, i])  # (B, pixels after i)
        return top


def drop_history(history, p):
    """History dropout (Bowman et al. 2016, their "word dropout"): each previous pixel (B, T),
    or each previous frame (B, T, FRAME), is zeros with probability p, so that the decoder must
    take what it loses from z. p = 0 draws nothing: training is then as without it, bit for bit."""
    if p == 0:
        return history
    keep = torch.rand(history.shape[:2], device=history.device) >= p  # (B, T)
    return history * keep.view(keep.shape + (1,) * (history.dim() - 2))


class RecurrentDecoder(Decoder, nn.Module):
    """The paper's decoder (section 3.2): a GRU whose initial state is the decoder's fusion h_z,
    "from which the future poses are obtained via the RNN decoder". Here a frame is an image row:
    the decoder runs outward from the condition, as a motion decoder runs from the last observed
    pose into the future, row 17 first and row 0 last. Each step reads the frame below the one it
    outputs (the first step: row 18, the condition's top row) and outputs that frame's pixel
    probabilities, independent given the state, as a pose's coordinates are in the paper.

    The split at pixel 500 cuts row 17: its last 4 pixels are condition. Its output for them is
    dropped, and the row fed to the next step carries the true ones, in generation too."""
    # teacher forcing falls over half of a 50-epoch run, so that the model trains as long in the
    # regime it generates in as it takes to get there
    fed_history, teacher_forcing_epochs = True, 25

    def __init__(self, fused_dim, config):
        super().__init__()
        self.rows = -(-config.output_dim // FRAME)  # 18: the top's rows, the last shared with the condition
        self.shared = self.rows * FRAME - config.output_dim  # 4: that row's pixels that are condition
        if (config.output_dim + config.condition_dim) % FRAME or config.condition_dim < self.shared + FRAME:
            raise ValueError(f"the recurrent decoder needs images of rows of {FRAME} pixels and the row below the "
                             f"top in the condition, got output_dim {config.output_dim}, condition_dim "
                             f"{config.condition_dim}")
        self.output_dim, self.history_dropout = config.output_dim, config.history_dropout
        self.forced_epochs = config.teacher_forcing_epochs
        # the ordinary CVAE's fusion is twice as wide: one linear layer gives the state its size
        self.initial_state = nn.Identity() if fused_dim == config.hidden_dim else nn.Linear(fused_dim,
                                                                                           config.hidden_dim)
        self.gru = nn.GRU(FRAME, config.hidden_dim, batch_first=True)
        self.frame = nn.Linear(config.hidden_dim, FRAME)  # a frame's pixel logits from the state
        self.teacher_forcing = 1.0  # in training, the probability of being fed the true row (schedule)

    def schedule(self, epoch):
        """Teacher forcing in epoch e (from 1): 1 at the first, falling linearly to 0 at epoch N + 1
        (paper, section 4), N = teacher_forcing_epochs; always 1 with N = 0."""
        n = self.forced_epochs
        self.teacher_forcing = 1.0 if n == 0 else max(0.0, 1 - (epoch - 1) / n)
        return self.teacher_forcing

    def forward(self, fused, condition, data=None):
        """(B, output_dim) probabilities. Teacher-forced (data given) in one GRU call; in training
        below a teacher forcing of 1, row by row, each step fed the true frame with that
        probability and otherwise its own output; without data, always its own."""
        state = self.initial_state(fused)[None].contiguous()  # (1, B, hidden_dim): h_z
        first = condition[:, self.shared:self.shared + FRAME]  # (B, FRAME): row 18
        if data is None:
            return self.unroll(state, first, condition[:, :self.shared])
        # rows 18, 17, ..., 0: the inputs are the first 18, the targets the last 18
        frames = torch.cat([data, condition[:, :self.shared + FRAME]], 1).unflatten(1, (-1, FRAME)).flip(1)
        inputs = frames[:, :-1]  # (B, rows, FRAME)
        if self.training and self.history_dropout:  # the rows the decoder made, not the condition's row 18
            inputs = torch.cat([inputs[:, :1], drop_history(inputs[:, 1:], self.history_dropout)], 1)
        if self.teacher_forcing == 1 or not self.training:
            states, _ = self.gru(inputs, state)  # (B, rows, hidden_dim)
            return self.to_top(torch.sigmoid(self.frame(states)))
        # scheduled sampling (Bengio et al. 2015), as the paper trains: per image and frame, the true
        # frame with probability teacher_forcing, else the decoder's own output
        true_fed = torch.rand(inputs.shape[:2], device=inputs.device) < self.teacher_forcing  # (B, rows)
        return self.unroll(state, first, condition[:, :self.shared], inputs, true_fed)

    def unroll(self, state, frame, shared_pixels, true_frames=None, true_fed=None):
        """Row by row for the whole batch, each step fed its own output as probabilities, without a
        gradient, as a sampled frame would be (as the autoregressive decoder generates, so that z
        and the Sampling fix a completion). In scheduled training, the true frame instead where
        true_fed (B, rows), and history dropout on the decoder's own frames."""
        outputs = []
        for t in range(self.rows):
            step, state = self.gru(frame[:, None], state)
            outputs.append(torch.sigmoid(self.frame(step[:, 0])))  # (B, FRAME)
            if t + 1 == self.rows:
                break
            frame = self.known_pixels(outputs[-1].detach(), t, shared_pixels)
            if true_frames is not None:
                if self.training and self.history_dropout:
                    frame = drop_history(frame[:, None], self.history_dropout)[:, 0]
                frame = torch.where(true_fed[:, t + 1, None], true_frames[:, t + 1], frame)
        return self.to_top(torch.stack(outputs, 1))

    def known_pixels(self, frame, t, shared_pixels):
        """The frame fed after step t: row 17 (t = 0) with its condition pixels put back."""
        if t or not self.shared:
            return frame
        return torch.cat([frame[:, :FRAME - self.shared], shared_pixels], 1)

    def to_top(self, frames):
        """(B, rows, FRAME) in decoding order (row 17 first) -> the top (B, output_dim) in raster order."""
        return frames.flip(1).flatten(1)[:, :self.output_dim]


# the decoders by name (Config.decoder): a new one is a Decoder class and an entry here
DECODERS = {"mlp": MLPDecoder, "autoregressive": AutoregressiveDecoder, "recurrent": RecurrentDecoder}
