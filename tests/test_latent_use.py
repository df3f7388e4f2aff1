"""The options that test the paper's claim (samples/README.md, "Does Mix-and-Match keep the latent in use?"):
the autoregressive decoder, the concatenating CVAE, and the diversity of completions by source."""

import pytest
import torch
import torch.nn.functional as F

from conftest import train_resume_and_measure
from model import Config, MixAndMatchCVAE, split_image
from sample import complete
from utils import (
    completion_distances,
    posterior_draws,
)


def autoregressive(**sizes):
    torch.manual_seed(0)
    model = MixAndMatchCVAE(Config(decoder="autoregressive", **sizes)).eval()
    with torch.no_grad():  # a map of the previous pixels strong enough that a mistake would show
        decoder = model.data_decoder
        decoder.previous_pixels.weight.normal_(0, 0.3).mul_(decoder.causal_mask)
    return model


def decoder_inputs(model, n=6):
    condition = torch.rand(n, 284)
    alpha = model.config.hidden_dim // 2
    return torch.randn(n, model.config.latent_dim), model.condition_encoder(condition), model.sampling(alpha)[0]


@pytest.mark.parametrize("i", [0, 1, 27, 250, 499])
def test_autoregressive_pixel_i_sees_only_the_pixels_before_it(i):
    model = autoregressive()
    z, condition_h, sampled = decoder_inputs(model)
    data = torch.rand(6, 500, requires_grad=True)
    changed = data.detach().clone()
    changed[:, i:] = torch.rand(6, 500 - i)  # pixels i and later
    out = model.decode(z, condition_h, sampled, data)
    assert torch.equal(out[:, :i + 1], model.decode(z, condition_h, sampled, changed)[:, :i + 1])
    (grad,) = torch.autograd.grad(out[:, :i + 1].sum(), data)
    assert torch.all(grad[:, i:] == 0)
    if i > 0:  # and it does see the ones before
        assert grad[:, :i].abs().sum() > 0


def test_autoregressive_likelihood_is_the_chain_rule_pixel_by_pixel():
    """The teacher-forced probabilities are p(x_i | x_<i, z, condition, I), so their BCE is
    -log p(x | z, ...) exactly: here against a loop that builds each pixel's logit on its own."""
    model = autoregressive(hidden_dim=16, latent_dim=4)
    z, condition_h, sampled = decoder_inputs(model)
    data = torch.rand(6, 500)
    decoder = model.data_decoder
    logits = decoder.mlp.logits(model.combine(condition_h, model.decode_latent(z), sampled))
    weight = decoder.previous_pixels.weight
    reference = torch.stack([torch.sigmoid(logits[:, i] + data[:, :i] @ weight[i, :i]) for i in range(500)], 1)
    assert torch.allclose(model.decode(z, condition_h, sampled, data), reference, atol=1e-6)
    # posterior_draws' BCE is this log-likelihood, for the same Sampling and z
    torch.manual_seed(5)
    _, bce, _, _ = posterior_draws(model, data, torch.rand(6, 284), 8, 1)
    torch.manual_seed(5)
    condition_h = model.condition_encoder(torch.rand(6, 284))
    sampled = model.sampling(8)[0]
    mu, logvar = model.encode(data, condition_h, sampled)
    z = model.reparameterize(mu, logvar)
    probabilities = model.decode(z, condition_h, sampled, data)
    assert torch.allclose(bce[0], F.binary_cross_entropy(probabilities, data, reduction="none").sum(1))


def test_generation_is_teacher_forcing_on_its_own_pixels():
    """Generation feeds back its own probabilities: teacher-forced with them, the decoder gives them
    back, pixel for pixel. Fed the true pixels, it gives what teacher forcing gives."""
    model = autoregressive()
    z, condition_h, sampled = decoder_inputs(model)
    with torch.no_grad():
        generated = model.decode(z, condition_h, sampled)
        assert torch.allclose(model.decode(z, condition_h, sampled, generated), generated, atol=1e-6)
        assert not torch.allclose(generated, model.decode(z, condition_h, sampled, torch.rand(6, 500)), atol=1e-3)
        # the same z and Sampling fix the completion: no other randomness
        assert torch.equal(generated, model.decode(z, condition_h, sampled))


def test_concat_sees_both_representations_whole_and_draws_no_sampling():
    torch.manual_seed(0)
    model = MixAndMatchCVAE(Config(conditioning="concat")).eval()
    assert model.sampling(64) == (None, None)
    data, condition = torch.rand(4, 500), torch.rand(4, 284)
    condition_h, z = model.condition_encoder(condition), torch.randn(4, 32)
    mu, logvar = model.encode(data, condition_h, None)
    fused = torch.cat([model.data_encoder(data), condition_h], dim=1)
    assert torch.allclose(mu, model.mean(fused)) and torch.allclose(logvar, model.std(fused))
    decoded = model.decode(z, condition_h, None)
    assert torch.allclose(decoded, model.data_decoder(torch.cat([condition_h, model.decode_latent(z)], dim=1)))
    state = torch.random.get_rng_state()
    model(data, condition, 64)
    after_forward = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    torch.randn(4, 32)  # a forward pass draws its z and nothing else
    assert torch.equal(after_forward, torch.random.get_rng_state())


def test_parameter_counts_of_the_three_conditionings_and_two_decoders():
    counts = {(c, d): sum(p.numel() for p in MixAndMatchCVAE(Config(conditioning=c, decoder=d)).parameters())
              for c in ("mix-and-match", "fixed", "concat") for d in ("mlp", "autoregressive")}
    assert counts[("mix-and-match", "mlp")] == counts[("fixed", "mlp")] == 311196  # the tutorial's model
    # concat's posterior layers and first decoder layer read 256 entries instead of 128
    assert counts[("concat", "mlp")] - counts[("mix-and-match", "mlp")] == 2 * 32 * 128 + 128 * 128
    for c in ("mix-and-match", "fixed", "concat"):
        assert counts[(c, "autoregressive")] - counts[(c, "mlp")] == 500 * 500  # half of it masked, never trained


def test_diversity_by_source_holds_the_other_source_fixed():
    torch.manual_seed(0)
    model = MixAndMatchCVAE(Config(hidden_dim=16, latent_dim=4)).eval()
    condition = torch.rand(5, 284)
    torch.manual_seed(1)
    one_sampling = model.sampling(8)[0]
    z_alone = complete(model, condition, 8, 4, sampled_indices=one_sampling)
    torch.manual_seed(1)
    model.sampling(8)
    with torch.no_grad():  # each completion its own z, all with the one Sampling
        expected = [model.decode(torch.randn(5, 4), model.condition_encoder(condition), one_sampling) for _ in range(4)]
    assert torch.allclose(split_image(z_alone)[0], torch.stack(expected, 1), atol=1e-6)
    one_z = torch.randn(5, 4)
    sampling_alone = split_image(complete(model, condition, 8, 4, z=one_z))[0]
    assert completion_distances(sampling_alone, sampling_alone[:, 0])[0].mean() > 0  # only I differs
    fixed = MixAndMatchCVAE(Config(hidden_dim=16, latent_dim=4, conditioning="fixed")).eval()
    same = split_image(complete(fixed, condition, 8, 4, z=one_z))[0]
    assert completion_distances(same, same[:, 0])[0].abs().max() < 1e-6  # the fixed split: 0 by construction


def test_autoregressive_concat_trains_resumes_and_samples_end_to_end(tmp_path, mnist_root, in_process):
    # the model flags come from the checkpoint: the resumed run continues exactly
    _, straight, resumed, result, metrics = train_resume_and_measure(
        in_process, tmp_path, mnist_root, ["--decoder", "autoregressive", "--conditioning", "concat"], 2)
    assert (straight["config"]["decoder"], straight["config"]["conditioning"]) == ("autoregressive", "concat")
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert "wrote grid.png: 20 rows x 6 columns" in result.stdout
    assert "concat conditioning, autoregressive decoder" in result.stdout
    assert metrics["diversity_z"]["model"] > 0
    # no Sampling: said, not printed as a zero that would read as a finding
    assert metrics["diversity_sampling"]["model"] is None
    assert "n/a: concat conditioning: the Sampling alone gives no diversity by construction" in result.stdout
