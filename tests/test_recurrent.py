"""The paper's own regime (samples/README.md, "Does Mix-and-Match keep the latent in use?"): the recurrent
decoder and its teacher-forcing schedule; and the two standard fixes for an ignored latent, free
bits and history dropout."""

import pytest
import torch
import torch.nn.functional as F

from conftest import train_resume_and_measure
from model import FRAME, Config, MixAndMatchCVAE, drop_history, free_bits_kl
from utils import (
    posterior_draws,
)


def recurrent(**config):
    torch.manual_seed(0)
    return MixAndMatchCVAE(Config(decoder="recurrent", hidden_dim=32, latent_dim=8, **config)).eval()


def decoder_inputs(model, n=6):
    condition = torch.rand(n, 284)
    return (torch.randn(n, model.config.latent_dim), model.condition_encoder(condition),
            model.sampling(model.config.hidden_dim // 2)[0], condition)


def rows_from(row):
    """The top's pixels from image row `row` down (rows row..17; row 17 has 24 top pixels)."""
    return slice(row * FRAME, 500)


@pytest.mark.parametrize("row", [17, 16, 9, 0])
def test_recurrent_row_r_sees_only_the_rows_below_it(row):
    """Row 17 is decoded first and row 0 last: row r's output may depend on rows r + 1.. only
    (the rows decoded before it), not on row r or the rows above, in values or in gradients."""
    model = recurrent()
    z, condition_h, sampled, condition = decoder_inputs(model)
    data = torch.rand(6, 500, requires_grad=True)
    changed = data.detach().clone()
    changed[:, :(row + 1) * FRAME] = torch.rand(6, min(500, (row + 1) * FRAME))  # rows 0..row
    out = model.decode(z, condition_h, sampled, data, condition)
    later_changed = model.decode(z, condition_h, sampled, changed, condition)
    assert torch.equal(out[:, rows_from(row)], later_changed[:, rows_from(row)])
    (grad,) = torch.autograd.grad(out[:, rows_from(row)].sum(), data)
    assert torch.all(grad[:, :(row + 1) * FRAME] == 0)
    if row < 17:  # and it does see the rows below it
        assert grad[:, (row + 1) * FRAME:].abs().sum() > 0


def test_recurrent_likelihood_is_the_chain_rule_row_by_row():
    """Teacher-forced, the probabilities are p(row r | rows below r, z, condition, I), computed here
    by a GRU cell written out step by step from the initial state, the fusion."""
    model = recurrent()
    z, condition_h, sampled, condition = decoder_inputs(model)
    data = torch.rand(6, 500)
    gru, image = model.data_decoder.gru, torch.cat([data, condition], 1).view(6, 28, 28)
    cell = torch.nn.GRUCell(FRAME, 32)
    cell.load_state_dict({name.removesuffix("_l0"): value for name, value in gru.state_dict().items()})
    h = model.combine(condition_h, model.decode_latent(z), sampled)  # h_z: the fusion is the initial state
    rows = {}
    for row in range(17, -1, -1):
        h = cell(image[:, row + 1], h)  # fed the true row below
        rows[row] = torch.sigmoid(model.data_decoder.frame(h))
    reference = torch.cat([rows[r] for r in range(18)], 1)[:, :500]  # row 17's last 4 outputs are the condition's
    with torch.no_grad():
        assert torch.allclose(model.decode(z, condition_h, sampled, data, condition), reference, atol=1e-5)
    # posterior_draws' BCE is this log-likelihood, for the same Sampling and z
    torch.manual_seed(5)
    _, bce, _, _ = posterior_draws(model, data, condition, 16, 1)
    torch.manual_seed(5)
    sampled = model.sampling(16)[0]
    mu, logvar = model.encode(data, condition_h, sampled)
    probabilities = model.decode(model.reparameterize(mu, logvar), condition_h, sampled, data, condition)
    assert torch.allclose(bce[0], F.binary_cross_entropy(probabilities, data, reduction="none").sum(1))


def test_recurrent_generation_is_teacher_forcing_on_its_own_rows():
    model = recurrent()
    z, condition_h, sampled, condition = decoder_inputs(model)
    with torch.no_grad():
        generated = model.decode(z, condition_h, sampled, condition=condition)
        assert torch.allclose(model.decode(z, condition_h, sampled, generated, condition), generated, atol=1e-6)
        assert not torch.allclose(generated, model.decode(z, condition_h, sampled, torch.rand(6, 500), condition),
                                  atol=1e-3)
        assert torch.equal(generated, model.decode(z, condition_h, sampled, condition=condition))  # z, I fix it


def test_the_schedule_feeds_true_rows_with_its_probability():
    """Training step by step: at probability 1 the decoder is teacher-forced (the one-call path), at
    0 it is fed its own rows (generation); in between, each image and row is one or the other."""
    model = recurrent()
    z, condition_h, sampled, condition = decoder_inputs(model)
    data = torch.rand(6, 500)
    model.train()  # the schedule is training's; the decoder's layers have no BatchNorm or dropout to change

    def scheduled(probability):  # as train.py sets it each epoch
        model.data_decoder.teacher_forcing = probability
        return model.decode(z, condition_h, sampled, data, condition)
    with torch.no_grad():
        forced = scheduled(1.0)
        generated = model.decode(z, condition_h, sampled, condition=condition)
        assert torch.allclose(scheduled(1 - 1e-9), forced, atol=1e-6)
        assert torch.allclose(scheduled(0.0), generated, atol=1e-6)
        mixed = scheduled(0.5)
        assert not torch.allclose(mixed, forced, atol=1e-4) and not torch.allclose(mixed, generated, atol=1e-4)
        assert torch.allclose(mixed[:, rows_from(17)], forced[:, rows_from(17)])  # row 17 is fed row 18 either way
        assert torch.equal(model.eval().decode(z, condition_h, sampled, data, condition), forced)  # tested forced


@pytest.mark.parametrize("epoch, n, expected", [(1, 25, 1.0), (2, 25, 0.96), (13, 25, 0.52), (25, 25, 0.04),
                                                (26, 25, 0.0), (50, 25, 0.0), (1, 1, 1.0), (2, 1, 0.0),
                                                (50, 0, 1.0)])
def test_teacher_forcing_probability_at_given_epochs(epoch, n, expected):
    model = MixAndMatchCVAE(Config(decoder="recurrent", teacher_forcing_epochs=n))
    assert model.schedule(epoch)["teacher_forcing"] == pytest.approx(expected)
    assert model.data_decoder.teacher_forcing == pytest.approx(expected)  # what its training steps read


def test_free_bits_is_the_formula_and_has_no_gradient_below_lambda():
    # two images, three units: the batch-mean KLs per unit are 0.5 (below lambda = 1), 2 and 1
    mu = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 2 ** 0.5]], requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    # KL per entry with logvar 0 is mu^2 / 2: unit means (0.5 + 0) / 2, (2 + 0) / 2, (0 + 1) / 2
    loss = free_bits_kl(mu, logvar, 1.0)
    assert loss.item() == pytest.approx(2 * (1.0 + 1.0 + 1.0))  # max(1, 0.25), max(1, 1), max(1, 0.5), times B
    loss = free_bits_kl(mu, logvar, 0.3)
    assert loss.item() == pytest.approx(2 * (0.3 + 1.0 + 0.5))
    mu.grad = None
    loss.backward()
    assert torch.all(mu.grad[:, 0] == 0)  # unit 0: its KL (0.25) is below lambda
    assert mu.grad[0, 1] == pytest.approx(2.0) and mu.grad[1, 2] == pytest.approx(2 ** 0.5)
    # lambda 0 is the KL of loss_terms
    assert free_bits_kl(mu, logvar, 0.0).item() == pytest.approx((mu ** 2 / 2).sum().item())


@pytest.mark.parametrize("shape", [(4000, 500), (4000, 17, FRAME)])
def test_history_dropout_zeroes_whole_pixels_or_rows_at_its_rate(shape):
    torch.manual_seed(0)
    history = torch.rand(shape) + 0.5  # never zero by itself
    dropped = drop_history(history, 0.25)
    zero = dropped == 0
    if len(shape) == 3:
        assert torch.equal(zero.all(2), zero.any(2))  # a row is dropped whole or not at all
        zero = zero.all(2)
    assert zero.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(dropped[~zero], history[~zero])
    assert drop_history(history, 0.0) is history


@pytest.mark.parametrize("decoder", ["autoregressive", "recurrent"])
def test_history_dropout_acts_in_training_only(decoder):
    data, condition = torch.rand(8, 500), torch.rand(8, 284)
    plain, dropped = (MixAndMatchCVAE(Config(decoder=decoder, history_dropout=p)) for p in (0.0, 0.5))
    dropped.load_state_dict(plain.state_dict())
    for mode in ("eval", "train"):
        outputs = []
        for model in (plain, dropped):
            getattr(model, mode)()
            torch.manual_seed(1)
            outputs.append(model(data, condition, 64)[0])
        assert torch.equal(*outputs) == (mode == "eval")
    with pytest.raises(ValueError, match="--history-dropout"):
        MixAndMatchCVAE(Config(history_dropout=0.5))  # the MLP decoder is fed no history


def test_recurrent_trains_on_its_schedule_resumes_mid_schedule_and_samples(tmp_path, mnist_root, in_process):
    flags = ["--decoder", "recurrent", "--conditioning", "concat", "--teacher-forcing-epochs", 2,
             "--history-dropout", 0.2, "--free-bits", 0.1]
    resumed_run, straight, resumed, result, metrics = train_resume_and_measure(in_process, tmp_path, mnist_root,
                                                                               flags, 3)
    assert "teacher forcing over 2 epochs, history dropout 0.2, free bits 0.1" in resumed_run.stdout
    assert [h["teacher_forcing"] for h in straight["history"]] == [1.0, 0.5, 0.0]
    assert (straight["config"]["decoder"], straight["config"]["history_dropout"]) == ("recurrent", 0.2)
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert "concat conditioning, recurrent decoder" in result.stdout
    assert "trained with free bits 0.1" in result.stdout
    assert metrics["diversity_z"]["model"] > 0
    refused = in_process("train.py", "--data-root", mnist_root, "--device", "cpu", "--epochs", "4", "--checkpoint-dir",
                         "x", "--resume", "first/mix_match_02.pth", "--free-bits", "0.5", cwd=tmp_path)
    assert refused.returncode == 1 and "--free-bits 0.5 (the checkpoint has 0.1)" in refused.stderr


@pytest.mark.parametrize("flags, message", [
    (["--teacher-forcing-epochs", "5"], "--teacher-forcing-epochs must be >= 0, and 0 unless --decoder recurrent"),
    (["--decoder", "recurrent", "--teacher-forcing-epochs", "-1"], "--teacher-forcing-epochs must be >= 0"),
    (["--history-dropout", "0.5"], "0 unless --decoder autoregressive or recurrent (the others are fed no history), "
                                   "got 0.5 with --decoder mlp"),
    (["--decoder", "recurrent", "--history-dropout", "1"], "--history-dropout must be in [0, 1)"),
    (["--free-bits", "-1"], "--free-bits must be a number of nats >= 0"),
    (["--free-bits", "nan"], "--free-bits must be a number of nats >= 0"),
])
def test_the_new_flags_refuse_what_means_nothing(tmp_path, in_process, flags, message):
    result = in_process("train.py", "--data-root", tmp_path, *flags, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
