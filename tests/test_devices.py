"""The CUDA path, checked on a CPU-only machine.

CUDA refuses an op whose tensors sit on different devices; the CPU cannot show the mistake, since
there every tensor is a CPU tensor. So the model and the data go to the `meta` device (shapes, no
values) and every op is recorded: one whose tensor arguments (0-dim scalars aside, which may
cross devices) sit on more than one device is the bug a GPU user would meet. Ops meta cannot run
(`.item()`, which on a GPU makes the CPU wait for the GPU) end a run; the ops before them have
been checked.

The recorder also counts what makes the CPU wait for the GPU on CUDA without mixing devices: a CPU
tensor, 0-dim scalars included, fed to an op on the device or copied there, and a Python number
assigned through indexing (`t[i] = True`: on CUDA, torch makes the number a CPU tensor and
index_put_ copies it over). A training step, an
evaluation and a sampling call must make none, so that CUDA queues their work without waiting.
And it records every float64 tensor on the device: Apple's MPS has no float64."""
import contextlib
import os

import pytest
import torch
import torch.serialization
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model import Config, MixAndMatchCVAE, split_image
from sample import completion_grid, evaluation_metrics
from train import evaluate, resume, train_epoch
from utils import (
    bottom_neighbours,
    digit_classifier,
    forked_devices,
    frechet_distance,
    get_device,
    load_or_train_classifier,
    manifold_measures,
    multimodal_distances,
    posterior_draws,
)

META = torch.device("meta")
ITEM = ("aten._local_scalar_dense.default", "aten.item.default")  # .item(), as no_grad and inference_mode dispatch it
TO_CPU = ("aten._to_copy.default", "aten.to.dtype_layout")  # .tolist() and .cpu(), likewise
# t[i] = number: on CUDA, torch makes the number a CPU tensor, which index_put_ copies over
INDEXED_ASSIGNMENT = (torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default)


class DeviceMixRecorder(TorchDispatchMode):
    """Records every op, and those whose non-scalar tensor arguments span several devices."""

    def __init__(self):
        super().__init__()
        self.ops, self.mixed, self.transfers, self.float64 = [], [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        devices = {str(t.device) for t in tensors}
        self.ops.append(str(func))
        if len(devices) > 1:
            self.mixed.append(f"{func} on {sorted(devices)}")
        result = func(*args, **(kwargs or {}))
        # a CPU tensor, of any size, fed to an op on the device or copied there
        every = [t for t in tree_flatten((args, kwargs or {}, result))[0] if isinstance(t, torch.Tensor)]
        cpu_fed = {t.device.type for t in every} > {"cpu"}
        if cpu_fed or func in INDEXED_ASSIGNMENT and args[2].dim() == 0:
            self.transfers.append(str(func))
        if any(t.dtype == torch.float64 and t.device.type != "cpu" for t in every):
            self.float64.append(str(func))
        return result


def record(fn, *args):
    """Run fn(*args) under the recorder, up to the end or to its first read of a value (.item(), or
    a copy to the CPU), which meta cannot run."""
    recorder = DeviceMixRecorder()
    try:
        with recorder:
            fn(*args)
    except NotImplementedError as e:  # a RuntimeError: first
        if "Cannot copy out of meta tensor" not in str(e):
            raise
        assert recorder.ops[-1] in TO_CPU  # ended at a copy to the CPU
    except RuntimeError as e:
        if "cannot be called on meta tensors" not in str(e):
            raise
        assert recorder.ops[-1] in ITEM  # ended at .item(), nothing else
    assert recorder.float64 == [], fn.__name__  # MPS has none
    return recorder


@pytest.mark.parametrize("config", [
    Config(), Config(conditioning="concat", decoder="autoregressive", history_dropout=0.2, free_bits=0.5),
    # at epoch 2 of 2 on its schedule: teacher forcing 0.5, row by row
    Config(decoder="recurrent", history_dropout=0.2, free_bits=0.5, teacher_forcing_epochs=2)],
    ids=["tutorial", "concat-ar", "recurrent"])
def test_train_epoch_keeps_every_tensor_on_the_data_device(config):
    model = MixAndMatchCVAE(config).to(META)
    model.schedule(2)
    # train.py's fused Adam refuses meta tensors; the plain loop makes the same updates op by op
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)
    recorder = record(train_epoch, model, optimizer, torch.empty(300, 784, device=META), config, 0)
    assert recorder.mixed == []
    # the whole epoch ran: three batches (128, 128, 44) of forward, backward and Adam, then .item()
    assert recorder.ops.count("aten.binary_cross_entropy_backward.default") == 3
    assert recorder.ops[-1] in ITEM
    # copies to the device once in the whole epoch, none per step: the shuffled order of its images
    # and the KL weights of its steps
    assert recorder.transfers == ["aten._to_copy.default"] * 2


def test_evaluation_reads_its_loss_once_after_every_batch():
    model = MixAndMatchCVAE(Config()).to(META)
    recorder = record(evaluate, model, torch.empty(300, 784, device=META), 64, 100)
    assert recorder.ops.count("aten.lerp.Tensor") == 3  # the BCE of each of the 3 batches, then one read
    assert recorder.ops[-1] in TO_CPU and recorder.transfers == []


@pytest.mark.parametrize("config", [Config(), Config(conditioning="concat", decoder="autoregressive"),
                                    Config(conditioning="concat", decoder="recurrent")],
                         ids=["tutorial", "concat-ar", "concat-recurrent"])
def test_evaluation_sampling_and_metrics_keep_every_tensor_on_the_data_device(config):
    # K = 2 completions for the autoregressive decoder: each generated pixel's ops pass the recorder
    k = 2 if config.decoder != "mlp" else 5
    model = MixAndMatchCVAE(config).to(META).eval()
    images = torch.empty(30, 784, device=META)
    data, condition = split_image(images)
    real = {"held_out": torch.empty(20, 784, device=META), "train": torch.empty(40, 784, device=META),
            "neighbour_tops": torch.empty(30, 3, 500, device=META), "threshold": 4.5}
    for fn, args in [(evaluate, (model, images, 64)),
                     (completion_grid, (model, images, 64, k)),  # sample() and complete()
                     (posterior_draws, (model, data, condition, 64, 4)),
                     (evaluation_metrics, (model, digit_classifier().to(META).eval(), images, 64, k, 4, 1.0, real))]:
        recorder = record(fn, *args)
        assert recorder.mixed == [], fn.__name__
        assert recorder.transfers == [], fn.__name__
        assert len(recorder.ops) > 50, fn.__name__  # it did run
    if config.conditioning != "concat":
        assert "aten.randperm.default" in record(completion_grid, model, images, 64, 5).ops  # a Sampling per column


def test_fidelity_measures_and_bottom_neighbours_keep_every_tensor_on_the_data_device():
    # evaluation_metrics stops at its first .item(), before these: here on their own, to their end
    features = torch.empty(20, 128, device=META)
    # the Fréchet distance computes on the CPU, in float64, which MPS has not: its first op copies there
    assert record(frechet_distance, features, features).ops in ([op] for op in TO_CPU)
    for fn, args in [(manifold_measures, (features, features)),
                     (bottom_neighbours, (torch.empty(7, 784, device=META), torch.empty(50, 784, device=META), 4)),
                     (multimodal_distances, (torch.empty(7, 5, 500, device=META),
                                             torch.empty(7, 3, 500, device=META), 4.5))]:
        recorder = record(fn, *args)
        assert recorder.mixed == [] and len(recorder.ops) > 3, fn.__name__


def test_digit_classifier_training_keeps_every_tensor_on_the_data_device(tmp_path, mnist_root):
    recorder = record(load_or_train_classifier, str(tmp_path / "classifier.pth"), mnist_root, META, 1)
    assert recorder.mixed == []
    assert recorder.ops.count("aten.convolution_backward.default") >= 2 * 3  # 2 convolutions, 3 batches of 128


def save_as_if_on_a_gpu(obj, path, monkeypatch):
    """torch.save, with every storage tagged cuda:0, as a checkpoint written on a GPU is."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a CPU-only machine does")
def test_a_gpu_checkpoint_samples_and_resumes_on_a_cpu_only_machine(tmp_path, mnist_root, monkeypatch, in_process):
    common = ["--data-root", mnist_root, "--device", "cpu", "--results-dir", tmp_path / "results"]
    in_process("train.py", *common, "--epochs", "2", "--checkpoint-dir", "straight", cwd=tmp_path, check=True)
    in_process("train.py", *common, "--epochs", "1", "--checkpoint-dir", "first", cwd=tmp_path, check=True)
    checkpoint = torch.load(tmp_path / "first" / "mix_match_01.pth", weights_only=True)
    assert checkpoint["device"] == "cpu" and checkpoint["rng"]["cuda"] is None  # what a CPU run records
    checkpoint["device"], checkpoint["rng"]["cuda"] = "cuda:1", torch.zeros(16, dtype=torch.uint8)  # as on a GPU
    save_as_if_on_a_gpu(checkpoint, tmp_path / "gpu.pth", monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading without map_location would do
        torch.load(tmp_path / "gpu.pth", weights_only=True)

    result = in_process("sample.py", "--data-root", mnist_root, "--device", "cpu", "--checkpoint", "gpu.pth",
                        "--out", "grid.png", cwd=tmp_path, check=True)
    assert "wrote grid.png" in result.stdout

    result = in_process("train.py", *common, "--epochs", "2", "--checkpoint-dir", "resumed", "--resume", "gpu.pth",
                        cwd=tmp_path, check=True)
    assert ("note: the run trained on cuda:1 and resumes on cpu: the CPU generator's state is restored, but the "
            "Sampling and z now draw from cpu's, so the draws from here on differ from an uninterrupted run's"
            in result.stdout)
    # here the CPU generator drew this run's batches and Samplings, so the resumed run is the straight one
    resumed = torch.load(tmp_path / "resumed" / "mix_match_02.pth", weights_only=True)["model"]
    straight = torch.load(tmp_path / "straight" / "mix_match_02.pth", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert sorted(os.listdir(tmp_path / "resumed")) == ["mix_match_02.pth", "train.lock"]


def resume_state(trained_on, cuda_state, device, monkeypatch, capsys):
    """train.py's resume() of a hand-made checkpoint (trained on `trained_on`, its CUDA
    generator's state `cuda_state`) onto `device`: (the CUDA states set, by device; what it printed)."""
    model = MixAndMatchCVAE(Config())
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint = {"optimizer": optimizer.state_dict(), "device": trained_on, "epoch": 1, "step": 3, "history": [],
                  "rng": {"torch": torch.get_rng_state(), "cuda": cuda_state}}
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, str(device))))
    resume(checkpoint, optimizer, Config(), torch.device(device))
    return restored, capsys.readouterr().out


def test_resume_restores_mps_generator_on_mps(monkeypatch, capsys):
    state = torch.arange(16, dtype=torch.uint8)
    model = MixAndMatchCVAE(Config())
    optimizer = torch.optim.Adam(model.parameters())
    restored = []
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: restored.append(state))
    checkpoint = {"optimizer": optimizer.state_dict(), "device": "mps", "epoch": 1, "step": 3, "history": [],
                  "rng": {"torch": torch.get_rng_state(), "cuda": None, "mps": state}}
    resume(checkpoint, optimizer, Config(), torch.device("mps"))
    assert len(restored) == 1 and torch.equal(restored[0], state) and capsys.readouterr().out == ""
    resume(checkpoint, optimizer, Config(), torch.device("cpu"))  # a Mac's run resumed on a CPU
    assert len(restored) == 1 and "trained on mps and resumes on cpu" in capsys.readouterr().out


def test_mps_is_taken_after_cuda_and_refused_in_one_line_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device("auto") == torch.device("cpu")
    with pytest.raises(SystemExit, match=r"^error: --device mps asked for Apple's MPS, which is not available here"):
        get_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac with Apple silicon
    assert get_device("auto") == get_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA first, where a machine has both
    assert get_device("auto") == torch.device("cuda")


def test_resume_restores_the_generator_of_the_gpu_the_run_used_onto_the_one_it_resumes_on(monkeypatch, capsys):
    state = torch.arange(16, dtype=torch.uint8)
    restored, out = resume_state("cuda:1", state, "cuda:0", monkeypatch, capsys)
    assert len(restored) == 1 and torch.equal(restored[0][0], state) and restored[0][1] == "cuda:0"
    assert out == "note: the run trained on cuda:1; its CUDA generator continues on cuda:0\n"
    restored, out = resume_state("cuda:0", state, "cuda:0", monkeypatch, capsys)
    assert len(restored) == 1 and out == ""  # the same GPU: nothing to say
    restored, out = resume_state("cpu", None, "cuda:0", monkeypatch, capsys)  # a CPU run resumed on a GPU
    assert restored == [] and "the run trained on cpu and resumes on cuda:0" in out and "differ" in out
    restored, out = resume_state("cpu", None, "cpu", monkeypatch, capsys)
    assert restored == [] and out == ""


def test_the_classifier_forks_the_generators_of_its_device_only(tmp_path, mnist_root, monkeypatch):
    assert forked_devices(torch.device("cpu")) == forked_devices(META) == []
    assert forked_devices(torch.device("cuda:2")) == [2] and forked_devices(torch.device("mps")) == [0]
    forked = []
    fork_rng = torch.random.fork_rng
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None, **kw: forked.append(devices) or fork_rng(
        devices=devices, **kw))
    load_or_train_classifier(str(tmp_path / "classifier.pth"), mnist_root, torch.device("cpu"), 1)
    load_or_train_classifier(str(tmp_path / "classifier.pth"), mnist_root, torch.device("cpu"), 1)  # the cache
    assert forked == [[], []]  # trained, then loaded: the CPU's generator only, never every GPU's


@contextlib.contextmanager
def torch_default_precision():
    """torch's precision flags at torch's own defaults inside, and after put back as they were, by
    assignment: they are computed attributes (a module's __getattr__), which monkeypatch cannot
    restore (pytest 9.2 deletes an attribute it did not find in the instance's __dict__)."""
    flags = {torch.backends.cudnn.rnn: "tf32", torch.backends.cudnn.conv: "tf32", torch.backends.cuda.matmul: "none"}
    before = {flag: flag.fp32_precision for flag in flags}
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for flag, default in flags.items():
            flag.fp32_precision = default
        yield
    finally:
        for flag, value in before.items():
            flag.fp32_precision = value
        torch.use_deterministic_algorithms(deterministic)


def test_the_precision_flags_are_put_back_as_they_were():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with torch_default_precision():
        assert (matmul.fp32_precision, conv.fp32_precision) == ("none", "tf32")
        matmul.fp32_precision, conv.fp32_precision = "tf32", "ieee"
        torch.use_deterministic_algorithms(True)
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("flags, precision, deterministic", [([], "ieee", False), (["--tf32"], "tf32", False),
                                                             (["--deterministic"], "ieee", True)])
def test_float32_unless_tf32_is_asked_for_and_determinism_on_request(trained, user, monkeypatch, flags, precision,
                                                                      deterministic):
    cudnn = torch.backends.cudnn
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with torch_default_precision():
        user("sample.py", "--checkpoint", trained, "--out", "g.png", *flags, check=True)
        assert (cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision) == (precision, precision)
        assert torch.backends.cuda.matmul.fp32_precision == precision
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic
        if flags == ["--tf32"]:  # train.py sets them through the same function
            user("train.py", "--epochs", 1, "--checkpoint-dir", "ck2", "--results-dir", "res2", check=True)
            assert cudnn.conv.fp32_precision == "ieee"


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a CPU-only machine does")
def test_the_gpu_check_says_there_is_no_gpu_here(tmp_path, in_process):
    result = in_process("tests/gpu_check.py", "--data-root", tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "no GPU here" in result.stdout and not result.stderr
