import pytest
import torch

from model import Config, MixAndMatchCVAE


def batchnorm(prefix, width):
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,), f"{prefix}.running_mean": (width,),
            f"{prefix}.running_var": (width,), f"{prefix}.num_batches_tracked": ()}


# The tutorial's published state_dict, key by key: Linear at 0 and 3, BatchNorm1d at 1 and 4
TUTORIAL_SHAPES = {
    "data_encoder.0.weight": (250, 500), "data_encoder.0.bias": (250,), **batchnorm("data_encoder.1", 250),
    "data_encoder.3.weight": (128, 250), "data_encoder.3.bias": (128,), **batchnorm("data_encoder.4", 128),
    "condition_encoder.0.weight": (142, 284), "condition_encoder.0.bias": (142,),
    **batchnorm("condition_encoder.1", 142),
    "condition_encoder.3.weight": (128, 142), "condition_encoder.3.bias": (128,),
    **batchnorm("condition_encoder.4", 128),
    "mean.weight": (32, 128), "mean.bias": (32,), "std.weight": (32, 128), "std.bias": (32,),
    "decode_latent.0.weight": (128, 32), "decode_latent.0.bias": (128,),
    "data_decoder.0.weight": (128, 128), "data_decoder.0.bias": (128,), **batchnorm("data_decoder.1", 128),
    "data_decoder.3.weight": (500, 128), "data_decoder.3.bias": (500,),
}


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 500, generator=g), torch.rand(n, 284, generator=g)


def reference_resampling(at_sampled, at_complementary, sampled_indices):
    """Column by column, the way the tutorial describes it."""
    fused = torch.zeros_like(at_sampled)
    for i in range(at_sampled.shape[1]):
        fused[:, i] = at_sampled[:, i] if i in sampled_indices.tolist() else at_complementary[:, i]
    return fused


def test_sampling_draws_a_partition_of_size_alpha_that_changes():
    model = MixAndMatchCVAE()
    draws = [model.sampling(64) for _ in range(5)]
    for sampled, complementary in draws:
        assert len(sampled) == 64 and len(complementary) == 64
        assert len(set(sampled.tolist()) & set(complementary.tolist())) == 0
        assert sorted(sampled.tolist() + complementary.tolist()) == list(range(128))
    assert len({tuple(sorted(s.tolist())) for s, _ in draws}) == 5


def test_sampling_follows_torch_manual_seed():
    model = MixAndMatchCVAE()
    torch.manual_seed(3)
    first = model.sampling(10)[0]
    torch.manual_seed(3)
    assert torch.equal(first, model.sampling(10)[0])


def test_resampling_puts_each_source_at_its_indices():
    a, b = torch.randn(4, 128), torch.randn(4, 128)
    sampled, complementary = MixAndMatchCVAE().sampling(40)
    fused = MixAndMatchCVAE.resampling(a, b, sampled)
    assert torch.equal(fused, reference_resampling(a, b, sampled))
    assert torch.equal(fused[:, sampled], a[:, sampled])
    assert torch.equal(fused[:, complementary], b[:, complementary])
    # the backward routes each gradient to the source that gave the entry, as the reference's does
    a.requires_grad_(), b.requires_grad_()
    weight = torch.randn(4, 128)
    grads = torch.autograd.grad((MixAndMatchCVAE.resampling(a, b, sampled) * weight).sum(), [a, b])
    expected = torch.autograd.grad((reference_resampling(a, b, sampled) * weight).sum(), [a, b])
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))


def test_encoder_sees_data_at_I_and_condition_at_complement():
    model = MixAndMatchCVAE().eval()  # eval: BatchNorm uses running statistics, so calls agree
    data, condition = batch()
    sampled, _ = model.sampling(64)
    mu, logvar = model.encode(data, model.condition_encoder(condition), sampled)
    fused = reference_resampling(model.data_encoder(data), model.condition_encoder(condition), sampled)
    assert torch.allclose(mu, model.mean(fused)) and torch.allclose(logvar, model.std(fused))


def test_decoder_sees_condition_at_I_and_latent_at_complement():
    model = MixAndMatchCVAE().eval()
    _, condition = batch()
    z = torch.randn(16, 32)
    sampled, _ = model.sampling(64)
    out = model.decode(z, model.condition_encoder(condition), sampled)
    fused = reference_resampling(model.condition_encoder(condition), model.decode_latent(z), sampled)
    assert torch.allclose(out, model.data_decoder(fused))


def test_forward_and_sample_shapes_and_ranges():
    model = MixAndMatchCVAE()
    data, condition = batch()
    reconstruction, mu, logvar = model(data, condition, 64)
    assert reconstruction.shape == (16, 500) and mu.shape == logvar.shape == (16, 32)
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1
    model.eval()
    samples = model.sample(condition, 64)
    assert samples.shape == (16, 500) and not samples.requires_grad
    assert samples.min() >= 0 and samples.max() <= 1
    torch.manual_seed(0)
    given = model.sample(condition, 64, z=torch.zeros(16, 32))
    torch.manual_seed(0)
    assert torch.equal(given, model.sample(condition, 64, z=torch.zeros(16, 32)))


def test_temperature_scales_the_latent():
    model = MixAndMatchCVAE(Config(conditioning="fixed")).eval()  # one Sampling: only z varies
    condition = batch()[1]
    cold = [model.sample(condition, 64, temperature=1e-6) for _ in range(3)]  # T -> 0: z -> 0
    assert all(torch.allclose(c, cold[0], atol=1e-5) for c in cold)
    assert not torch.allclose(model.sample(condition, 64), model.sample(condition, 64), atol=1e-3)
    for temperature in [1.0, 2.5]:  # T = 1 is the tutorial's prior; in general z = T * eps, then a Sampling
        torch.manual_seed(1)
        completions = model.sample(condition, 64, temperature=temperature)
        torch.manual_seed(1)
        z = temperature * torch.randn(16, 32)
        expected = model.decode(z, model.condition_encoder(condition), model.sampling(64)[0])
        assert torch.equal(completions, expected)
    for bad in [0, -1.0]:
        with pytest.raises(ValueError, match="temperature must be > 0"):
            model.sample(condition, 64, temperature=bad)


@pytest.mark.parametrize("alpha", [0, 1, 127, 128])
def test_extreme_alphas_run(alpha):
    model = MixAndMatchCVAE()
    reconstruction, _, _ = model(*batch(), alpha)
    assert torch.isfinite(reconstruction).all()


def test_forward_encodes_the_condition_once():
    model = MixAndMatchCVAE()
    model(*batch(), 64)
    assert model.condition_encoder[1].num_batches_tracked == 1  # BatchNorm statistics updated once
    assert model.data_encoder[1].num_batches_tracked == 1


def test_gradients_reach_both_encoders_and_the_decoder():
    model = MixAndMatchCVAE()
    data, condition = batch()
    reconstruction, mu, logvar = model(data, condition, 64)
    (reconstruction.sum() + mu.sum() + logvar.sum()).backward()
    for name in ["data_encoder.0.weight", "condition_encoder.0.weight", "mean.weight", "std.weight",
                 "decode_latent.0.weight", "data_decoder.0.weight", "data_decoder.3.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("alpha", [-1, 129])
def test_alpha_out_of_range_names_the_range(alpha):
    model = MixAndMatchCVAE()
    with pytest.raises(ValueError, match=r"alpha must be in 0\.\.128"):
        model(*batch(), alpha)
    with pytest.raises(ValueError, match=r"alpha must be in 0\.\.128"):
        model.sample(batch()[1], alpha)


def test_wrong_widths_name_the_expected_width():
    model = MixAndMatchCVAE()
    data, condition = batch()
    with pytest.raises(ValueError, match=r"data must have shape \(batch, 500\)"):
        model(data[:, :499], condition, 64)
    with pytest.raises(ValueError, match=r"condition must have shape \(batch, 284\)"):
        model(data, data, 64)
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 32\)"):
        model.sample(condition, 64, z=torch.zeros(16, 8))


def test_tutorial_state_dict_layout_loads_strictly():
    model = MixAndMatchCVAE()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == TUTORIAL_SHAPES
    tutorial = {k: torch.randn(shape) if shape else torch.tensor(7) for k, shape in TUTORIAL_SHAPES.items()}
    MixAndMatchCVAE().load_state_dict(tutorial, strict=True)


def test_custom_sizes():
    model = MixAndMatchCVAE(Config(hidden_dim=32, latent_dim=4))
    reconstruction, mu, _ = model(*batch(), 10)
    assert reconstruction.shape == (16, 500) and mu.shape == (16, 4)
