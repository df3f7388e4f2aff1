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
enough to do without the latent, each a module below the model: one autoregressive over pixels
(`decoder="autoregressive"`, AutoregressiveDecoder), and the paper's own, a GRU over image rows
whose initial state is the fusion (`decoder="recurrent"`, RecurrentDecoder).
"""
from dataclasses import dataclass

import torch
from torch import nn

CONDITIONINGS = ("mix-and-match", "fixed", "concat")
DECODERS = ("mlp", "autoregressive", "recurrent")
FRAME = 28  # one image row: a frame of the recurrent decoder, as a pose is one of the paper's


@dataclass
class ModelConfig:
    input_dim: int = 500  # data: the top of the image (pixels 0..499)
    condition_dim: int = 284  # condition: the bottom (pixels 500..783)
    output_dim: int = 500  # the decoder completes the top
    hidden_dim: int = 128
    latent_dim: int = 32
    # "mix-and-match": a fresh random I per pass (the tutorial, the paper's method); "fixed": I is
    # always the first alpha indices, the paper's deterministic split (its Table 1 baseline);
    # "concat": no Sampling, the two representations side by side, the ordinary CVAE
    conditioning: str = "mix-and-match"
    # "mlp": the tutorial's decoder, every pixel independent given the fused hidden vector;
    # "autoregressive": top pixel i also sees the top pixels before it in raster order;
    # "recurrent": the paper's GRU, one image row a step, its initial state the fusion
    decoder: str = "mlp"
    # history dropout (Bowman et al. 2016, "word dropout"): in training, each previous pixel or
    # frame the autoregressive or recurrent decoder is fed is zeros with this probability
    history_dropout: float = 0.0


def _encoder(in_dim, hidden_dim):
    # Linear -> BatchNorm1d -> ReLU twice, halving first (tutorial: 500 -> 250 -> 128)
    return nn.Sequential(
        nn.Linear(in_dim, in_dim // 2), nn.BatchNorm1d(in_dim // 2), nn.ReLU(),
        nn.Linear(in_dim // 2, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
    )


class MLPDecoder(nn.Sequential):
    """The tutorial's decoder: Linear -> BatchNorm1d -> ReLU, then the pixel probabilities (128 ->
    128 -> 500), every pixel independent given the fusion. Called as every decoder is, with the
    condition and the true top that it does not need; its layers keep the tutorial's names."""

    def forward(self, fused, condition=None, data=None):
        return super().forward(fused)  # (B, output_dim)


def _decoder(fused_dim, config):
    return MLPDecoder(
        nn.Linear(fused_dim, config.hidden_dim), nn.BatchNorm1d(config.hidden_dim), nn.ReLU(),
        nn.Linear(config.hidden_dim, config.output_dim), nn.Sigmoid(),
    )


class MixAndMatchCVAE(nn.Module):

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or ModelConfig()
        if config.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {config.conditioning!r}")
        if config.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {config.decoder!r}")
        if not 0 <= config.history_dropout < 1 or (config.history_dropout and config.decoder == "mlp"):
            raise ValueError(f"history_dropout must be in [0, 1), and 0 with the mlp decoder (it has no history), "
                             f"got {config.history_dropout}")
        # concatenation keeps both representations whole, so the layers after it are twice as wide
        fused_dim = 2 * config.hidden_dim if config.conditioning == "concat" else config.hidden_dim
        self.data_encoder = _encoder(config.input_dim, config.hidden_dim)
        self.condition_encoder = _encoder(config.condition_dim, config.hidden_dim)
        # posterior q(z | data, condition); `std` holds the log-variance, as in the tutorial
        self.mean = nn.Linear(fused_dim, config.latent_dim)
        self.std = nn.Linear(fused_dim, config.latent_dim)
        # lifts z to hidden_dim so that Resampling can mix it with the condition
        self.decode_latent = nn.Sequential(nn.Linear(config.latent_dim, config.hidden_dim), nn.ReLU())
        if config.decoder == "mlp":
            self.data_decoder = _decoder(fused_dim, config)  # the tutorial's
        elif config.decoder == "autoregressive":
            self.autoregressive_decoder = AutoregressiveDecoder(fused_dim, config)
        else:  # the paper's decoder
            self.recurrent_decoder = RecurrentDecoder(fused_dim, config)
        # the curriculum of perturbation's stage in training (paper, section 3.3), which train.py sets
        # each epoch as it sets model.train(); None: the tutorial's Sampling, as at test time
        self.curriculum_stage = None

    @property
    def decoder(self):
        """The decoder of config.decoder; every one is called decoder(fused, condition, data)."""
        return getattr(self, {"mlp": "data_decoder", "autoregressive": "autoregressive_decoder",
                              "recurrent": "recurrent_decoder"}[self.config.decoder])

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
        return self.decoder(fused, condition, data)

    def forward(self, data, condition, alpha, sampled_indices=None):
        """One Sampling shared by encoder and decoder; returns (reconstruction, mu, logvar), the
        expressive decoders' teacher-forced with `data`. A fresh Sampling unless sampled_indices are
        given (train.py draws it before the step it may compile, which then takes I as data)."""
        self._check_width(data, self.config.input_dim, "data")
        self._check_width(condition, self.config.condition_dim, "condition")
        if sampled_indices is None:
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


class AutoregressiveDecoder(nn.Module):
    """The tutorial's decoder (`mlp`) with each top pixel also conditioned on the pixels before it
    in raster order: logit of pixel i += sum over j < i of W_ij * pixel j, a strictly
    lower-triangular linear map (a fully visible sigmoid belief net, Neal 1992, on top of the
    decoder). It sees the stroke so far, the pixel to the left and the one a row up, which is what
    the MLP decoder can only get through z; one masked matmul when teacher-forced, O(pixels^2)
    multiply-adds to generate a top."""

    def __init__(self, fused_dim, config):
        super().__init__()
        self.mlp = _decoder(fused_dim, config)
        self.history_dropout = config.history_dropout
        self.previous_pixels = nn.Linear(config.output_dim, config.output_dim, bias=False)
        self.register_buffer("causal_mask", torch.ones(config.output_dim, config.output_dim).tril(-1),
                             persistent=False)
        with torch.no_grad():
            self.previous_pixels.weight.mul_(self.causal_mask)  # the entries never used stay zero

    def forward(self, fused, condition=None, data=None):
        """(B, output_dim) probabilities: teacher-forced with the true top `data`, else generated."""
        logits = self.mlp[:-1](fused)  # (B, output_dim), before the Sigmoid
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


def curriculum_order(alpha, hidden_dim, stage, device):
    """The hidden indices in the order Sampling takes I from at a curriculum stage s (paper, section
    3.3): the first alpha - s of the known part (the first alpha indices), s drawn from the rest,
    then the others. Stage 0 is the fixed split; "fixed" conditioning is always at it."""
    if not 0 <= stage <= min(alpha, hidden_dim - alpha):
        raise ValueError(f"curriculum_stage must be in 0..{min(alpha, hidden_dim - alpha)}, got {stage}")
    known, rest = torch.arange(alpha, device=device), alpha + torch.randperm(hidden_dim - alpha, device=device)
    kept = alpha - stage  # known indices that stay in I at this stage
    return torch.cat([known[:kept], rest[:stage], known[kept:], rest[stage:]])


def drop_history(history, p):
    """History dropout (Bowman et al. 2016, their "word dropout"): each previous pixel (B, T),
    or each previous frame (B, T, FRAME), is zeros with probability p, so that the decoder must
    take what it loses from z. p = 0 draws nothing: training is then as without it, bit for bit."""
    if p == 0:
        return history
    keep = torch.rand(history.shape[:2], device=history.device) >= p  # (B, T)
    return history * keep.view(keep.shape + (1,) * (history.dim() - 2))


class RecurrentDecoder(nn.Module):
    """The paper's decoder (section 3.2): a GRU whose initial state is the decoder's fusion h_z,
    "from which the future poses are obtained via the RNN decoder". Here a frame is an image row:
    the decoder runs outward from the condition, as a motion decoder runs from the last observed
    pose into the future, row 17 first and row 0 last. Each step reads the frame below the one it
    outputs (the first step: row 18, the condition's top row) and outputs that frame's pixel
    probabilities, independent given the state, as a pose's coordinates are in the paper.

    The split at pixel 500 cuts row 17: its last 4 pixels are condition. Its output for them is
    dropped, and the row fed to the next step carries the true ones, in generation too."""

    def __init__(self, fused_dim, config):
        super().__init__()
        self.rows = -(-config.output_dim // FRAME)  # 18: the top's rows, the last shared with the condition
        self.shared = self.rows * FRAME - config.output_dim  # 4: that row's pixels that are condition
        if (config.output_dim + config.condition_dim) % FRAME or config.condition_dim < self.shared + FRAME:
            raise ValueError(f"the recurrent decoder needs images of rows of {FRAME} pixels and the row below the "
                             f"top in the condition, got output_dim {config.output_dim}, condition_dim "
                             f"{config.condition_dim}")
        self.output_dim, self.history_dropout = config.output_dim, config.history_dropout
        # the ordinary CVAE's fusion is twice as wide: one linear layer gives the state its size
        self.initial_state = nn.Identity() if fused_dim == config.hidden_dim else nn.Linear(fused_dim,
                                                                                           config.hidden_dim)
        self.gru = nn.GRU(FRAME, config.hidden_dim, batch_first=True)
        self.frame = nn.Linear(config.hidden_dim, FRAME)  # a frame's pixel logits from the state
        # teacher forcing in training, which train.py sets each epoch (set_teacher_forcing): the
        # probability of being fed the true row, a tensor that a compiled step reads as data
        self.register_buffer("teacher_forcing", torch.ones(()), persistent=False)
        self.always_true_rows = True  # the probability is 1: one GRU call, no draw

    def set_teacher_forcing(self, probability):
        self.teacher_forcing.fill_(probability)
        self.always_true_rows = probability == 1

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
        if self.always_true_rows or not self.training:
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
