"""
The Mix-and-Match CVAE (Aliakbarian et al., "A Stochastic Conditioning Scheme for Diverse Human
Motion Prediction", CVPR 2020), on the tutorial's task: complete the top of an MNIST digit
(the data, pixels 0..499) from its bottom (the condition, pixels 500..783).

The condition is not concatenated to the data or the latent: on every forward pass, Sampling
picks a random set I of `alpha` indices out of `hidden_dim`, and Resampling builds each hidden
vector from two sources, one at I and the other at the complement. The layer names match the
tutorial's, so its published state_dict loads with strict=True.
"""
from dataclasses import dataclass

import torch
from torch import nn

CONDITIONINGS = ("mix-and-match", "fixed")


@dataclass
class ModelConfig:
    input_dim: int = 500  # data: the top of the image (pixels 0..499)
    condition_dim: int = 284  # condition: the bottom (pixels 500..783)
    output_dim: int = 500  # the decoder completes the top
    hidden_dim: int = 128
    latent_dim: int = 32
    # "mix-and-match": a fresh random I per pass (the tutorial); "fixed": I is always the first
    # alpha indices, the paper's deterministic (concatenation) baseline of Table 1
    conditioning: str = "mix-and-match"


def _encoder(in_dim, hidden_dim):
    # Linear -> BatchNorm1d -> ReLU twice, halving first (tutorial: 500 -> 250 -> 128)
    return nn.Sequential(
        nn.Linear(in_dim, in_dim // 2), nn.BatchNorm1d(in_dim // 2), nn.ReLU(),
        nn.Linear(in_dim // 2, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
    )


class MixAndMatchCVAE(nn.Module):

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or ModelConfig()
        if config.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {config.conditioning!r}")
        self.data_encoder = _encoder(config.input_dim, config.hidden_dim)
        self.condition_encoder = _encoder(config.condition_dim, config.hidden_dim)
        # posterior q(z | data, condition); `std` holds the log-variance, as in the tutorial
        self.mean = nn.Linear(config.hidden_dim, config.latent_dim)
        self.std = nn.Linear(config.hidden_dim, config.latent_dim)
        # lifts z to hidden_dim so that Resampling can mix it with the condition
        self.decode_latent = nn.Sequential(nn.Linear(config.latent_dim, config.hidden_dim), nn.ReLU())
        self.data_decoder = nn.Sequential(
            nn.Linear(config.hidden_dim, config.hidden_dim), nn.BatchNorm1d(config.hidden_dim), nn.ReLU(),
            nn.Linear(config.hidden_dim, config.output_dim), nn.Sigmoid(),
        )

    def sampling(self, alpha, curriculum_stage=None):
        """Sampling (README walk-through, step 3): a random set I of `alpha` distinct indices out of hidden_dim,
        and its complement Ī. Drawn from torch's generator, so torch.manual_seed fixes a run.

        At a curriculum stage s (paper, section 3.3) I is the first alpha - s indices of the known
        part (the first alpha) plus s drawn from the rest; "fixed" conditioning is stage 0."""
        hidden_dim = self.config.hidden_dim
        if not 0 <= alpha <= hidden_dim:
            raise ValueError(f"alpha must be in 0..{hidden_dim} (a count of hidden units), got {alpha}")
        device = self.mean.weight.device
        if self.config.conditioning == "fixed":
            curriculum_stage = 0
        if curriculum_stage is None:
            order = torch.randperm(hidden_dim, device=device)
        else:
            if not 0 <= curriculum_stage <= min(alpha, hidden_dim - alpha):
                raise ValueError(f"curriculum_stage must be in 0..{min(alpha, hidden_dim - alpha)}, "
                                 f"got {curriculum_stage}")
            known, rest = torch.arange(alpha, device=device), alpha + torch.randperm(hidden_dim - alpha, device=device)
            kept = alpha - curriculum_stage  # known indices that stay in I at this stage
            order = torch.cat([known[:kept], rest[:curriculum_stage], known[kept:], rest[curriculum_stage:]])
        return order[:alpha], order[alpha:]  # sampled_indices I, complementary_indices Ī

    @staticmethod
    def resampling(at_sampled, at_complementary, sampled_indices):
        """Resampling (README walk-through, step 4): a hidden vector whose entries I come from the first
        source and whose entries Ī, the rest, from the second."""
        is_sampled = torch.zeros(at_sampled.shape[1], dtype=torch.bool, device=at_sampled.device)
        is_sampled[sampled_indices] = True
        # one select, forward and backward, gives what the tutorial's zeros tensor plus two
        # indexed assignments gives, at a fraction of the cost (tests/bench_train.py)
        return torch.where(is_sampled, at_sampled, at_complementary)  # (B, hidden_dim)

    def encode(self, data, condition_h, sampled_indices):
        # the encoder sees the data at I and the condition at the complement Ī
        fused = self.resampling(self.data_encoder(data), condition_h, sampled_indices)  # (B, hidden_dim)
        return self.mean(fused), self.std(fused)  # mu, logvar: (B, latent_dim) each

    @staticmethod
    def reparameterize(mu, logvar):
        # z = mu + sigma * eps keeps the sampling differentiable in mu and logvar
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z, condition_h, sampled_indices):
        # the decoder sees the condition at I and the lifted latent at the complement Ī
        fused = self.resampling(condition_h, self.decode_latent(z), sampled_indices)  # (B, hidden_dim)
        return self.data_decoder(fused)  # (B, output_dim), pixel probabilities

    def forward(self, data, condition, alpha, curriculum_stage=None):
        """One Sampling shared by encoder and decoder; returns (reconstruction, mu, logvar)."""
        self._check_width(data, self.config.input_dim, "data")
        self._check_width(condition, self.config.condition_dim, "condition")
        sampled_indices, _ = self.sampling(alpha, curriculum_stage)
        # one condition representation feeds both Resamplings (and updates BatchNorm once a step)
        condition_h = self.condition_encoder(condition)  # (B, hidden_dim)
        mu, logvar = self.encode(data, condition_h, sampled_indices)
        z = self.reparameterize(mu, logvar)
        return self.decode(z, condition_h, sampled_indices), mu, logvar

    @torch.no_grad()
    def sample(self, condition, alpha, z=None, temperature=1.0):
        """Completions for each condition row, with z ~ N(0, temperature^2 I) unless given: the prior
        at temperature 1, the tutorial's; lower trades diversity for typical completions."""
        self._check_width(condition, self.config.condition_dim, "condition")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if z is None:
            z = temperature * torch.randn(condition.shape[0], self.config.latent_dim, device=condition.device)
        self._check_width(z, self.config.latent_dim, "z")
        return self.decode(z, self.condition_encoder(condition), self.sampling(alpha)[0])

    @staticmethod
    def _check_width(x, width, name):
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must have shape (batch, {width}), got {tuple(x.shape)}")
