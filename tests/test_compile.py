"""train.py --compile, the training step compiled by torch.compile (README, Speed), on tiny
synthetic MNIST: each case a run meets compiles before its first epoch and nothing recompiles
after (the KL weight changes every step, the teacher forcing every epoch, the last batch is
smaller); the run trains what the eager run of its seed trains, but for rounding; its checkpoint is
an ordinary one that sample.py and --resume take; a platform that cannot compile is refused in one
line before any work."""
import os
import re

import pytest
import torch
import torch._dynamo

from conftest import EPOCH_LINE, run_script

COMPILED = re.compile(r"compiled the training step in \d+ s: (\d+) graph\(s\)")


@pytest.fixture
def graphs():
    """A clean slate for torch.compile in this process, its setting put back after by assignment (a
    config module's computed attribute, which pytest 9.2's monkeypatch would delete); yields a
    function that counts the graphs compiled since."""
    torch._dynamo.reset()
    allow_rnn = torch._dynamo.config.allow_rnn
    torch._dynamo.utils.counters.clear()
    try:
        yield lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.config.allow_rnn = allow_rnn


def train(in_process, cwd, mnist_root, folder, *flags):
    result = in_process("train.py", "--data-root", mnist_root, "--device", "cpu", "--results-dir", "res",
                        "--checkpoint-dir", folder, *flags, cwd=cwd, check=True)
    return result.stdout, [tuple(map(float, line)) for line in EPOCH_LINE.findall(result.stdout)]


def test_compiled_run_compiles_once_per_batch_size_trains_as_eager_and_resumes(tmp_path, mnist_root, in_process,
                                                                               graphs):
    # 300 images in batches of 128: a last batch of 44, the second graph
    out, compiled = train(in_process, tmp_path, mnist_root, "compiled", "--epochs", 2, "--compile")
    assert COMPILED.search(out).group(1) == "2" and graphs() == 2  # none after the first epoch started
    _, eager = train(in_process, tmp_path, mnist_root, "eager", "--epochs", 2)
    for compiled_epoch, eager_epoch in zip(compiled, eager, strict=True):  # and BCE, KL, its weight, test loss
        assert compiled_epoch == pytest.approx(eager_epoch, rel=1e-4)

    a, b = (torch.load(tmp_path / folder / "mix_match_02.pth", weights_only=True) for folder in ("compiled", "eager"))
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()  # no _orig_mod. of a compiled module
    assert a["args"]["compile"] is True and b["args"]["compile"] is False
    in_process("sample.py", "--data-root", mnist_root, "--device", "cpu", "--checkpoint", "compiled/mix_match_02.pth",
               "--out", "grid.png", cwd=tmp_path, check=True)
    assert (tmp_path / "grid.png").stat().st_size > 0

    _, first = train(in_process, tmp_path, mnist_root, "resumed", "--epochs", 1, "--compile")
    _, resumed = train(in_process, tmp_path, mnist_root, "resumed", "--epochs", 2, "--compile",
                       "--resume", "resumed/mix_match_01.pth")
    assert first + resumed == compiled  # the same compiled code, the same draws: the same run


def test_recurrent_schedule_compiles_its_two_cases_once(tmp_path, mnist_root, in_process, graphs):
    # batches of 100 divide 300 images; the probability of the true row is 1, 0.5, then 0: one graph
    # for the whole teacher forcing of epoch 1, one for every scheduled epoch after
    flags = ["--decoder", "recurrent", "--batch-size", 100, "--teacher-forcing-epochs", 2, "--epochs", 3]
    out, _ = train(in_process, tmp_path, mnist_root, "compiled", *flags, "--compile")
    assert COMPILED.search(out).group(1) == "2" and graphs() == 2
    train(in_process, tmp_path, mnist_root, "eager", *flags)
    compiled, eager = (torch.load(tmp_path / folder / "mix_match_03.pth", weights_only=True)["history"]
                       for folder in ("compiled", "eager"))
    # the rows the decoder feeds itself round differently and feed the next: a few parts in 10,000
    for compiled_epoch, eager_epoch in zip(compiled, eager, strict=True):
        for key in ("train_rec", "train_kl", "test_loss"):
            assert compiled_epoch[key] == pytest.approx(eager_epoch[key], rel=1e-3), key


def test_a_platform_that_cannot_compile_is_refused_before_any_work(tmp_path, mnist_root):
    # no C++ compiler for Inductor's CPU code, and an empty cache, so that it must compile
    env = {"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = run_script("train.py", "--data-root", mnist_root, "--device", "cpu", "--epochs", 1, "--compile",
                        "--checkpoint-dir", "ck", "--results-dir", "res", cwd=tmp_path, check=False, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: --compile cannot compile the training step here (")
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("; train without --compile\n")
    assert os.listdir(tmp_path / "ck") == [] and os.listdir(tmp_path / "res") == []
