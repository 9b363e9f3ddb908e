"""Tokenizer training: frozen parts stay frozen, a tiny model overfits, exact resume, DDP, bad input.

Tiny widths and 32 px images (4x4 token grid) keep these fast on CPU; the code
path is the 128 px one (resolution is a setting of the same architecture).
"""
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures_tokenizer import TINY_TOKENIZER, make_codebook_artifacts, make_tiny_tokenizer, tiny_images
from models.clip import load_clip
from models import losses
from models.losses import DiscriminatorLoss, GeneratorLoss, LossWeights
from models.tokenizer_io import load_tokenizer, save_tokenizer
from engine import train as engine_train
from engine.train import (AUTHORS_BATCH, AUTHORS_LR, TrainConfig, amp_dtype, batch_and_lr, build_training,
                          check_divergence, half_clip, train_step)
from test_losses import L2Perceptual
from tiny_clip import make_tiny_clip
from utils.artifacts import load_json, load_tensors, read_manifest, save_json
from utils.cli import settings_of
from utils.errors import V2LError
from utils.dist import Dist

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "step4_train_tokenizer.py"
RES = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(clip, n, res=RES, seed=0):
    x128, x_clip = tiny_images(clip, n, seed)
    return F.interpolate(x128, size=(res, res), mode="bilinear", align_corners=False), x_clip


def _training(tokenizer, **train_config):
    loss = GeneratorLoss(LossWeights(disc_start=0), perceptual=L2Perceptual())
    return build_training(tokenizer, loss, DiscriminatorLoss(ndf=8), TrainConfig(**train_config),
                          Dist())


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_step_changes_only_the_trainable_parts(tmp_path, channels_last):
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    state = _training(tokenizer, channels_last=channels_last)
    frozen = {"clip." + k: v.clone() for k, v in clip.model.state_dict().items()}
    frozen |= {k: tokenizer.state_dict()[k].clone() for k in
               ("tok_embeddings.weight", "tok_embeddings_global.weight", "llm_ids")}
    trainable = {id(p): p.detach().clone() for p in tokenizer.trainable_parameters()}
    disc = {k: v.clone() for k, v in state.disc_loss.state_dict().items()}
    logs, _ = train_step(state, *_images(clip, 2), lr=1e-3)
    assert {"l1", "vq", "lpips", "g_loss", "adaptive_w", "d_loss"} <= set(logs)
    now = {"clip." + k: v for k, v in clip.model.state_dict().items()} | tokenizer.state_dict()
    for k, v in frozen.items():
        assert torch.equal(now[k], v), k
    changed = [not torch.equal(p, trainable[id(p)]) for p in tokenizer.trainable_parameters()]
    assert all(changed), f"{changed.count(False)} trainable tensors did not move"
    assert tokenizer.codebook_projection.weight.grad is not None
    assert not torch.equal(state.disc_loss.state_dict()["discriminator.main.0.weight"],
                           disc["discriminator.main.0.weight"])


# ---- the authors' training recipe ----------------------------------------------------------

def _script_defaults() -> dict:
    return {setting.name: setting.default for setting in settings_of(SCRIPT.read_text())}


def test_defaults_are_the_authors_recipe():
    defaults = _script_defaults()
    assert defaults["ADAM_EPS"] == 1e-7 and defaults["AMP"] == "fp16"
    assert defaults["LPIPS_DROPOUT"] is True and defaults["DISC_FRESH_FORWARD"] is True
    assert defaults["BATCH_SIZE"] == AUTHORS_BATCH and defaults["LR"] == AUTHORS_LR
    assert defaults["LR_SCALING"] == "none" and defaults["SYNC_BN"] is False
    assert (defaults["LOCAL_CODEBOOK"], defaults["PROJECTOR"], defaults["CROSS_ATTENTION"]) == \
        ("clip", True, True)
    # the library's defaults are the script's: one recipe, whichever way it is built
    config, weights = TrainConfig(), LossWeights()
    pairs = {"EPOCHS": config.epochs, "WARMUP_EPOCHS": config.warmup_epochs, "LR": config.lr,
             "MIN_LR": config.min_lr, "BETAS": config.betas, "ADAM_EPS": config.eps,
             "AMP": config.amp, "DISC_FRESH_FORWARD": config.disc_fresh_forward,
             "LOG_EVERY": config.log_every, "CHANNELS_LAST": config.channels_last,
             "SYNC_BN": config.sync_bn,
             "CODEBOOK_WEIGHT": weights.codebook_weight, "L2_WEIGHT": weights.l2_weight,
             "PERCEPTUAL_WEIGHT": weights.perceptual_weight, "DISC_WEIGHT": weights.disc_weight,
             "DISC_START": weights.disc_start}
    assert {k: defaults[k] for k in pairs} == pairs


def test_adam_epsilon_reaches_both_optimisers(tmp_path):
    tokenizer = make_tiny_tokenizer(tmp_path, resolution=RES)[0]
    for eps in (1e-7, 1e-8):
        state = _training(tokenizer, eps=eps)
        assert state.opt_g.defaults["eps"] == eps and state.opt_d.defaults["eps"] == eps


@pytest.mark.parametrize("fresh", [True, False])
def test_discriminator_sees_the_updated_generator(tmp_path, fresh):
    """Fresh forward (the authors): D's fakes are the reconstructions of the tokenizer AFTER
    its update; otherwise the ones the generator loss was computed on."""
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    state = _training(tokenizer, disc_fresh_forward=fresh)
    x, x_clip = _images(clip, 2)
    with torch.no_grad():
        before = tokenizer(x, x_clip)["rec"]
    seen = []
    state.disc_loss.register_forward_hook(lambda m, args, out: seen.append(args[1].detach()))
    train_step(state, x, x_clip, lr=1e-3)
    with torch.no_grad():
        after = tokenizer(x, x_clip)["rec"]
    assert len(seen) == 1 and not torch.allclose(before, after)
    expected, other = (after, before) if fresh else (before, after)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(seen[0], other)


def test_precision_settings(tmp_path, monkeypatch):
    from utils import dist
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for native in (False, True):   # bf16 autocast on a CPU only where it runs natively
        monkeypatch.setattr(dist, "native_bf16", lambda device, native=native: native)
        assert amp_dtype("bf16", cpu) == (torch.bfloat16 if native else None)
    monkeypatch.undo()
    assert amp_dtype("fp16", cuda) == torch.float16 and amp_dtype("bf16", cuda) == torch.bfloat16
    assert amp_dtype("none", cuda) is None and amp_dtype("fp16", cpu) is None
    with pytest.raises(V2LError, match="--amp fp32"):
        amp_dtype("fp32", cpu)
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    state = _training(tokenizer, amp="fp16")          # on CPU: float32, no loss scaling
    assert state.amp_dtype is None and not state.scaler.is_enabled()
    assert next(clip.model.parameters()).dtype == torch.float32
    logs, _ = train_step(state, *_images(clip, 2), lr=1e-3)
    assert torch.isfinite(logs["loss"])
    half_clip(clip)                                   # what fp16 on a GPU does to CLIP
    assert all(p.dtype == torch.float16 for p in clip.model.parameters())


def test_global_batch_and_learning_rate():
    """--batch_size is per process (the authors' script: 8 per GPU); the global batch is that
    times the processes; --lr_scaling scales from the authors' global batch of 8 on one GPU."""
    assert batch_and_lr(8, 1, 4.5e-4) == (8, 4.5e-4)             # the authors' run
    assert batch_and_lr(8, 8, 4.5e-4) == (64, 4.5e-4)            # 8 GPUs x 8: lr kept ("none")
    assert batch_and_lr(8, 16, 4.5e-4) == (128, 4.5e-4)          # 2 nodes x 8 GPUs
    assert batch_and_lr(8, 8, 4.5e-4, "linear") == (64, pytest.approx(8 * 4.5e-4))
    assert batch_and_lr(16, 2, 4.5e-4, "sqrt") == (32, pytest.approx(2 * 4.5e-4))
    assert batch_and_lr(1, 8, 4.5e-4, "linear") == (8, pytest.approx(4.5e-4))
    for bad in (0, -2):
        with pytest.raises(V2LError, match=f"--batch_size {bad}: the images per process"):
            batch_and_lr(bad, 4, 4.5e-4)
    with pytest.raises(V2LError, match="--lr_scaling"):
        batch_and_lr(8, 1, 4.5e-4, "cubic")


# ---- overflow and divergence ------------------------------------------------------------------

def _scaled(state, scale=2.0 ** 10, **scaler_args):
    """The training state with an fp16-style GradScaler (enabled on CPU too: the loss scaling,
    skipping and back-off are device-independent)."""
    state.scaler = torch.amp.GradScaler("cpu", init_scale=scale, **scaler_args)
    return state


def _generator_weights(tokenizer):
    return [p.detach().clone() for p in tokenizer.trainable_parameters()]


def _moved(tokenizer, before):
    return [not torch.equal(p, b) for p, b in zip(tokenizer.trainable_parameters(), before)]


def test_overflowing_adaptive_weight_skips_the_step_and_backs_the_scale_off(tmp_path, monkeypatch):
    """Both scaled last-layer gradients overflow (inf / inf): the GradScaler skips the step
    and halves its scale, as for overflowing gradients; the next steps train."""
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    state = _scaled(_training(tokenizer))
    x, x_clip = _images(clip, 2)
    before = _generator_weights(tokenizer)
    real = losses.last_layer_grad
    monkeypatch.setattr(losses, "last_layer_grad",
                        lambda loss, layer: torch.full_like(real(loss, layer), math.inf))
    logs, _ = train_step(state, x, x_clip, lr=1e-3)
    assert torch.isnan(logs["adaptive_w"]) and not torch.isfinite(logs["loss"])
    assert not any(_moved(tokenizer, before))                 # skipped
    assert state.scaler.get_scale() == 2.0 ** 9               # backed off
    monkeypatch.setattr(losses, "last_layer_grad", real)
    for _ in range(2):
        logs, _ = train_step(state, x, x_clip, lr=1e-3)
        assert torch.isfinite(logs["loss"]) and torch.isfinite(logs["adaptive_w"])
    assert all(_moved(tokenizer, before))                     # trained on
    assert state.scaler.get_scale() == 2.0 ** 9 and state.overflow_streak == 0


def test_a_huge_loss_scale_overflows_once_then_trains(tmp_path):
    """No patching: a loss scale near float32's largest value makes the scaled gradients
    (and the adaptive weight's norms) overflow; the step is skipped, the scale backs off,
    and training goes on at the reduced scale."""
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    state = _scaled(_training(tokenizer), scale=2.0 ** 126, backoff_factor=2.0 ** -116)
    x, x_clip = _images(clip, 2)
    before = _generator_weights(tokenizer)
    logs, _ = train_step(state, x, x_clip, lr=1e-3)
    assert not torch.isfinite(logs["loss"]) and not any(_moved(tokenizer, before))
    assert state.scaler.get_scale() == 2.0 ** 10
    logs, _ = train_step(state, x, x_clip, lr=1e-3)
    assert torch.isfinite(logs["loss"]) and all(_moved(tokenizer, before))


def test_an_overflow_that_persists_stops_with_one_line(tmp_path, monkeypatch):
    """The watch runs on the device; check_divergence (logging steps, epoch ends, before a
    checkpoint) reads it: it names the iteration at which the streak reached the limit, also
    when the check comes iterations later."""
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    state = _scaled(_training(tokenizer, max_overflow_steps=3))
    x, x_clip = _images(clip, 2)
    x[0, 0, 0, 0] = math.nan                                  # every iteration overflows
    for i in range(3):
        train_step(state, x, x_clip, lr=1e-3)
        state.step += 1
        check_divergence(state)                               # not yet: 2 back-offs seen
    for i in range(2):
        train_step(state, x, x_clip, lr=1e-3)
        state.step += 1
    with pytest.raises(V2LError) as err:
        check_divergence(state)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "training diverged: the last 3 iterations before iteration 3 ")
    assert "loss scale down to 128" in message


def test_non_finite_loss_without_loss_scaling_stops_at_the_next_check(tmp_path):
    """Without loss scaling the first non-finite loss is recorded on the device; the next
    check stops with its iteration (the checkpoint writer checks first: nothing after it is
    saved)."""
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    state = _training(tokenizer)
    assert not state.scaler.is_enabled()
    x, x_clip = _images(clip, 2)
    train_step(state, x, x_clip, lr=1e-3)
    state.step += 1
    check_divergence(state)                                   # finite so far
    bad = x.clone()
    bad[0, 0, 0, 0] = math.nan
    for batch in (bad, x):
        train_step(state, batch, x_clip, lr=1e-3)
        state.step += 1
    with pytest.raises(V2LError, match="training diverged: non-finite loss at iteration 1; "):
        check_divergence(state)
    with pytest.raises(V2LError, match="non-finite loss at iteration 1; "):
        engine_train.save_checkpoint(state, tmp_path / "ckpt", Dist(), {})
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_divergence_stops_the_script_with_one_line(world, tmp_path, monkeypatch, capsys):
    """A real divergence (a learning rate that overflows the weights): one error line, exit 2,
    no artifact."""
    out = tmp_path / "diverged"
    assert _step4(_args(world, out, lr=1e38, warmup_epochs=0), monkeypatch) == 2
    err = [line for line in capsys.readouterr().err.split("\n") if "error:" in line]
    assert len(err) == 1 and err[0].split("\r")[-1].startswith(
        "error: training diverged: non-finite loss at iteration"), err
    assert not (out / "tokenizer.pt").exists()


def test_discriminator_sync_batchnorm(tmp_path):
    """SYNC_BN converts the discriminator's BatchNorm under DDP on GPUs (names unchanged, so a
    checkpoint loads either way), leaves one process alone, and refuses CPU processes: there
    PyTorch's SyncBatchNorm cannot run (its forward accepts GPU tensors only)."""
    def bns(disc):
        return [type(m) for m in disc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    disc = DiscriminatorLoss(ndf=8)
    keys = set(disc.state_dict())
    assert engine_train.sync_batchnorm(disc, Dist(), True) is disc
    assert bns(disc) == [torch.nn.BatchNorm2d] * 2
    gpus = Dist(rank=0, world=2, device=torch.device("cuda", 0))
    assert engine_train.sync_batchnorm(disc, gpus, False) is disc and bns(disc) == [torch.nn.BatchNorm2d] * 2
    with pytest.raises(V2LError, match="--sync_bn true: SyncBatchNorm runs on GPUs only.*--sync_bn false"):
        engine_train.sync_batchnorm(disc, Dist(rank=0, world=2), True)
    synced = engine_train.sync_batchnorm(disc, gpus, True)
    assert bns(synced) == [torch.nn.SyncBatchNorm] * 2 and set(synced.state_dict()) == keys


def test_the_clip_precision_is_recorded(tmp_path, monkeypatch):
    """The tokenizer keeps the precision CLIP ran in while it trained (fp16 on a GPU by
    default); a CPU run is fp32."""
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=RES)
    assert _training(tokenizer, amp="fp16").tokenizer.config.clip_precision == "fp32"   # CPU
    monkeypatch.setattr(engine_train, "amp_dtype", lambda amp, device: torch.float16)
    _training(tokenizer, amp="fp16")                          # as on a GPU
    assert tokenizer.config.clip_precision == "fp16"
    assert next(clip.model.parameters()).dtype == torch.float16
    save_tokenizer(tokenizer, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok", clip=load_clip(tmp_path / "clip")).config.clip_precision == "fp16"


# ---- two processes ---------------------------------------------------------------------------

DDP_WORKER = """
import json, math, os, sys
from pathlib import Path
import torch, torch.nn.functional as F
from utils import dist
from engine import train as engine_train
from engine.train import TrainConfig, build_training, train_step
from fixtures_tokenizer import make_tiny_tokenizer, tiny_images
from models import losses
from models.losses import DiscriminatorLoss, GeneratorLoss, LossWeights
from test_losses import L2Perceptual
from utils.errors import V2LError

ddp = dist.init("cpu")
torch.manual_seed(0)
tmp = Path(sys.argv[1])
tokenizer, clip, _ = make_tiny_tokenizer(tmp / f"rank{ddp.rank}", resolution=32)
state = build_training(tokenizer, GeneratorLoss(LossWeights(disc_start=0), perceptual=L2Perceptual()),
                       DiscriminatorLoss(ndf=8), TrainConfig(), ddp)
x, x_clip = tiny_images(clip, 2, seed=ddp.rank)
x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
result = {}
# loss scaling: only rank 1's adaptive weight overflows; every rank skips and backs off alike
state.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
real = losses.last_layer_grad
if ddp.rank == 1:
    losses.last_layer_grad = lambda loss, layer: torch.full_like(real(loss, layer), math.inf)
before = [p.detach().clone() for p in tokenizer.trainable_parameters()]
train_step(state, x, x_clip, lr=1e-3)
losses.last_layer_grad = real
result["skipped"] = all(torch.equal(p, b) for p, b in zip(tokenizer.trainable_parameters(), before))
result["scale"] = state.scaler.get_scale()
logs, _ = train_step(state, x, x_clip, lr=1e-3)
result["trained"] = bool(torch.isfinite(logs["loss"])) and not any(
    torch.equal(p, b) for p, b in zip(tokenizer.trainable_parameters(), before))
# no loss scaling: a non-finite loss on rank 1 alone stops both ranks at the same iteration
state.scaler = torch.amp.GradScaler("cpu", enabled=False)
if ddp.rank == 1:
    x[0, 0, 0, 0] = math.nan
try:
    train_step(state, x, x_clip, lr=1e-3)
    engine_train.check_divergence(state)
    result["stopped"] = None
except V2LError as e:
    result["stopped"] = str(e)
except SystemExit as e:
    result["stopped"] = f"exit {e.code}"
(tmp / f"result{ddp.rank}.json").write_text(json.dumps(result))
"""


@pytest.mark.slow
def test_two_ranks_decide_alike_on_overflow_and_divergence(tmp_path):
    """2 gloo processes: an overflow on one rank is skipped by both (same scale after), the
    next step trains on both; a non-finite loss on one rank stops both (rank 0 with the one
    line, rank 1 silently), where one rank raising alone left the other waiting."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(worker), str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0["skipped"] and r1["skipped"] and r0["scale"] == r1["scale"] == 512.0
    assert r0["trained"] and r1["trained"]
    assert r0["stopped"].startswith("training diverged: non-finite loss at iteration 0 on 1 of 2 processes")
    assert r1["stopped"] == "exit 2"


def _psnr(a, b):
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


def test_tiny_model_overfits_one_image(tmp_path):
    """L1 + VQ only (the GAN starts later): 20 dB PSNR on one smooth 128 px image (the method's
    size: a 16x16 token grid) within 150 steps."""
    res = 128
    tokenizer, clip, _ = make_tiny_tokenizer(tmp_path, resolution=res)
    state = build_training(tokenizer,
                           GeneratorLoss(LossWeights(perceptual_weight=0, disc_start=10 ** 9)),
                           DiscriminatorLoss(ndf=8), TrainConfig(), Dist())
    x, x_clip = _images(clip, 1, res)
    x = F.interpolate(F.avg_pool2d(x, 8), size=(res, res), mode="bilinear", align_corners=False)
    with torch.no_grad():
        start = _psnr(tokenizer(x, x_clip)["rec"], x)
    best = start
    for step in range(150):
        logs, _ = train_step(state, x, x_clip, lr=2e-3)
        if step % 10 == 9:
            with torch.no_grad():
                best = max(best, _psnr(tokenizer(x, x_clip)["rec"], x))
            if best > 20:
                break
    assert best > 20, f"PSNR {start:.1f} -> {best:.1f} dB after {step + 1} steps"


# ---- the script -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny CLIP, codebook artifacts embedded 'with' it, and a folder of 4 training images."""
    tmp = tmp_path_factory.mktemp("step4")
    clip_dir = make_tiny_clip(tmp / "clip")
    dirs = make_codebook_artifacts(tmp, clip_dir)
    manifest = load_json(dirs["codebook"] / "manifest.json")
    manifest["info"]["clip"] = load_clip(clip_dir).ident     # as step 2 records it
    save_json(dirs["codebook"] / "manifest.json", manifest)
    rng = np.random.default_rng(0)
    for c in range(2):
        folder = tmp / "images" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp / "empty" / "train" / "class0").mkdir(parents=True)
    return {"clip": Path(clip_dir), "images": tmp / "images", **dirs}


def _args(w, out, **over):
    args = {"data_dir": w["images"], "codebook_dir": w["codebook"], "global_dir": w["global"],
            "out_dir": out, "clip": w["clip"], "resolution": RES, "epochs": 3,
            "warmup_epochs": 1, "batch_size": 2, "num_workers": 0, "perceptual_weight": 0,
            "disc_start": 1, "disc_ndf": 8, "log_every": 1, "save_every_epoch": 1,
            "n_samples": 2, "device": "cpu",
            **{k: v for k, v in TINY_TOKENIZER.items() if k != "ch_mult"}} | over
    return [f"--{k}={v}" for k, v in args.items()]


def _step4(argv, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def _losses(out):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("d_loss")) for r in lines if r["kind"] == "train"]


def test_kill_and_resume_reproduces_the_uninterrupted_run(world, tmp_path, monkeypatch, capsys):
    assert _step4(_args(world, tmp_path / "full"), monkeypatch) == 0
    assert "global batch 2 (1 process(es) x 2), learning rate 0.00045" in capsys.readouterr().err
    full = _losses(tmp_path / "full")
    assert [s for s, _, _ in full] == list(range(1, 7)) and full[-1][2] is not None
    m = read_manifest(tmp_path / "full", "tokenizer", made_by="step4_train_tokenizer.py")
    assert set(m["inputs"]) == {"codebook", "global"}
    assert sorted(p.name for p in (tmp_path / "full" / "samples").iterdir()) == \
        ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    assert (tmp_path / "full" / "checkpoints" / "epoch_0002.pt").is_file()
    tokenizer = load_tokenizer(tmp_path / "full", clip=load_clip(world["clip"]))
    assert tokenizer.config.resolution == RES
    assert tokenizer.config.global_topk == TINY_TOKENIZER["global_topk"]

    def killed(state, *a, **k):
        if state.step == 3:                               # mid-way through epoch 1
            raise KeyboardInterrupt
        return train_step(state, *a, **k)
    monkeypatch.setattr(engine_train, "train_step", killed)
    assert _step4(_args(world, tmp_path / "resumed"), monkeypatch) == 130
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    monkeypatch.setattr(engine_train, "train_step", train_step)
    assert _step4(_args(world, tmp_path / "resumed"), monkeypatch) == 0
    assert "resuming from" in capsys.readouterr().err
    resumed = _losses(tmp_path / "resumed")
    assert [s for s, _, _ in resumed] == [s for s, _, _ in full]
    np.testing.assert_allclose([l for _, l, _ in resumed], [l for _, l, _ in full], rtol=0, atol=1e-6)
    np.testing.assert_allclose([d for _, _, d in resumed[1:]], [d for _, _, d in full[1:]], atol=1e-6)
    # a finished run is not retrained; its checkpoint does not resume a run of other settings
    assert _step4(_args(world, tmp_path / "resumed"), monkeypatch) == 0
    assert "up to date" in capsys.readouterr().out
    assert _step4(_args(world, tmp_path / "resumed", epochs=4, z_channels=64), monkeypatch) == 2
    err = capsys.readouterr().err
    assert "rebuilding: settings changed (--epochs 3 there, 4 now; --z_channels 32 there, 64 now)" in err
    assert "a checkpoint of a run with other settings (--epochs 3 there, 4 now" in err
    assert not (tmp_path / "resumed" / "manifest.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"codebook_dir": "nowhere"}, "step2_codebook_embedding.py"),
    ({"global_dir": "nowhere"}, "step3_codebook_filtering.py"),
    ({"data_dir": "EMPTY"}, "no images found"),
    ({"perceptual_weight": 0.1, "vgg_path": "missing/vgg16-397923af.pth"}, "--perceptual_weight 0"),
])
def test_bad_input_is_one_clear_line(world, tmp_path, monkeypatch, capsys, change, message):
    change = {k: (world["images"].parent / "empty" if v == "EMPTY" else v) for k, v in change.items()}
    assert _step4(_args(world, tmp_path / "out", **change), monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "out" / "tokenizer.pt").exists()


def test_clip_must_match_the_codebook(world, tmp_path, monkeypatch, capsys):
    other = make_tiny_clip(tmp_path / "other_clip", seed=1)
    assert _step4(_args(world, tmp_path / "out", clip=other), monkeypatch) == 2
    assert "pass the CLIP of step 2" in capsys.readouterr().err


@pytest.mark.slow
def test_two_rank_ddp_run_writes_the_artifact(world, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(SCRIPT), *_args(world, out, epochs=2, batch_size=2)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # --batch_size is per process: 2 processes x 2 images
    assert "global batch 4 (2 process(es) x 2), learning rate 0.00045" in res.stderr
    m = read_manifest(out, "tokenizer")
    assert m["info"]["world"] == 2 and m["info"]["iterations"] == 2   # 4 images / (2 ranks x 2)
    assert m["info"]["global_batch"] == 4
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["state"]
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 2
    # after epoch 0 rank 0 had run CLIP on its 2 of the 4 images; the cache it saved then
    # holds all 4: the ranks shared what they filled
    first = torch.load(out / "checkpoints" / "epoch_0001.pt", weights_only=False)["state"]
    assert first["epoch"] == 1 and len(first["global_cache"]["filled"]) == 4
    assert first["global_cache"]["filled"].all()
    losses = _losses(out)
    assert len(losses) == 2 and losses[1][2] is not None   # the GAN ran under DDP
    load_tokenizer(out, clip=load_clip(world["clip"]))


def test_ablation_flags_train_and_are_recorded(world, tmp_path, monkeypatch, capsys):
    """The authors' ablations: random local codebook, no projector, decoder without cross-attention."""
    out = tmp_path / "ablation"
    argv = _args(world, out, epochs=1, local_codebook="random", projector=False,
                 cross_attention=False)
    assert _step4(argv, monkeypatch) == 0
    tokenizer = load_tokenizer(out, clip=load_clip(world["clip"]))
    config = tokenizer.config
    assert (config.local_codebook, config.projector, config.cross_attention) == ("random", False, False)
    keys = set(tokenizer.state_dict())
    assert not any(k.startswith(("codebook_projection.", "decoder.mid.cross_attn_1.")) for k in keys)
    clip_codebook = load_tensors(world["codebook"] / "local_codebook.safetensors")["embeddings"]
    assert not torch.allclose(tokenizer.tok_embeddings.weight, clip_codebook)
    # a checkpoint of the paper model is not resumed as an ablation, nor the other way round
    assert _step4(_args(world, out, epochs=1), monkeypatch) == 2
    assert "--cross_attention False there, True now" in capsys.readouterr().err


# ---- the global tokens: CLIP once per image -----------------------------------------------------

class _Views(torch.utils.data.Dataset):
    """In-memory training images as the loader yields them (both views and the index)."""

    def __init__(self, x128, x_clip):
        self.x128, self.x_clip = x128, x_clip

    def __len__(self):
        return len(self.x128)

    def __getitem__(self, i):
        return {"image": (self.x128[i], self.x_clip[i]), "label": 0, "index": i}


class _Log:
    def __init__(self):
        self.records = []

    def write(self, record, kind="train"):
        self.records.append({"kind": kind, **record})


def _train_epochs(tmp, global_cache: bool, epochs=3, n_images=6):
    """A few epochs through engine.train's loop; (log records, summaries, weights, number of
    CLIP calls, state)."""
    torch.manual_seed(0)
    tokenizer, clip, _ = make_tiny_tokenizer(tmp, resolution=RES)
    calls = []
    encode = clip.encode_images
    clip.encode_images = lambda x: calls.append(len(x)) or encode(x)
    state = _training(tokenizer, global_cache=global_cache, log_every=1)
    dataset = _Views(*_images(clip, n_images, seed=3))
    engine_train.use_global_cache(state, dataset)
    loader = engine_train.make_loader(dataset, 2, 0, seed=0, ddp=Dist())
    log = _Log()
    summaries = [engine_train.train_one_epoch(state, loader, Dist(), log) for _ in range(epochs)]
    weights = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    weights |= {"disc." + k: v.clone() for k, v in state.disc_loss.state_dict().items()}
    return log.records, summaries, weights, calls, state


def test_cached_global_tokens_train_exactly_as_clip_every_time(tmp_path):
    """3 epochs of 3 iterations, shuffled, GAN and fresh discriminator forward on: the run
    that computes each image's global tokens once and reuses them logs the same losses, bit
    for bit, and ends with the same weights as the run that calls CLIP twice per iteration.
    Bitwise, not within a tolerance: the same indices give the decoder the same input, and
    everything else runs the same operations in the same order (CLIP is frozen, in eval mode,
    and draws no random numbers). CLIP runs 2 x 9 times the old way, 3 times (the first
    epoch's batches) the new way."""
    old = _train_epochs(tmp_path / "old", global_cache=False)
    new = _train_epochs(tmp_path / "new", global_cache=True)
    assert old[3] == [2] * 18 and new[3] == [2] * 3
    assert len(old[0]) == 9 and "d_loss" in old[0][-1]
    assert old[0] == new[0]                                   # every logged loss term
    assert old[1] == new[1]                                   # epoch means, codebook usage
    assert old[2].keys() == new[2].keys()
    for k in old[2]:
        assert torch.equal(old[2][k], new[2][k]), k
    # what the cache holds is what CLIP gives now for all 6 images in one batch
    state = new[4]
    cache = state.global_cache
    assert cache.filled.all() and cache.idx.dtype == np.int16
    x_clip = _images(state.tokenizer.clip, 6, seed=3)[1]
    with torch.no_grad():
        expected = state.tokenizer.global_tokens(x_clip)[0]
    assert torch.equal(torch.from_numpy(cache.idx).long(), expected)


def test_global_cache_sync_ident_and_checkpoint(monkeypatch):
    """Two ranks filled different images: after sync each holds both; a first answer is never
    overwritten; the state is refused for other images."""
    from engine.global_cache import GlobalTokenCache, cache_ident
    from utils import dist
    book = torch.randn(16, 8)
    ident = cache_ident(["a.png", "b.png", "c.png"], "clip", 2, "l2", book)
    assert ident != cache_ident(["a.png", "c.png", "b.png"], "clip", 2, "l2", book)
    assert ident != cache_ident(["a.png", "b.png", "c.png"], "clip", 2, "l2", book + 1e-6)
    caches = [GlobalTokenCache(3, 2, 16, ident) for _ in range(2)]
    caches[0].add(torch.tensor([0, 2]), torch.tensor([[1, 2], [5, 6]]))
    caches[1].add(torch.tensor([1, 2]), torch.tensor([[3, 4], [9, 9]]))
    for c in caches:
        c.flush()
    assert caches[0].lookup(torch.tensor([0, 1]), torch.device("cpu")) is None
    shared = [(np.concatenate(c._new), c.idx[np.concatenate(c._new)]) for c in caches]
    monkeypatch.setattr(dist, "barrier", lambda d, what="": None)
    monkeypatch.setattr(dist, "all_gather_objects", lambda obj, d: shared)
    for r, c in enumerate(caches):
        c.sync(Dist(rank=r, world=2))
        got = c.lookup(torch.tensor([0, 1, 2]), torch.device("cpu"))
        assert got.dtype == torch.long and got[:2].tolist() == [[1, 2], [3, 4]]
        assert got[2].tolist() == ([5, 6] if r == 0 else [9, 9])   # each keeps its own first
    other = GlobalTokenCache(3, 2, 16, "other images")
    assert not other.load_state_dict(caches[0].state_dict()) and not other.filled.any()
    again = GlobalTokenCache(3, 2, 16, ident)
    assert again.load_state_dict(caches[0].state_dict())
    assert np.array_equal(again.idx, caches[0].idx) and again.filled.all()


def _records(out, kind):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "kind"} for r in lines if r["kind"] == kind]


def test_a_run_killed_mid_epoch_resumes_from_its_mid_epoch_checkpoint(world, tmp_path,
                                                                      monkeypatch, capsys):
    """--save_every 3 with 4 iterations per epoch: killed at iteration 7 (batch 3 of epoch 1),
    the run resumes from the checkpoint after iteration 6 (batch 2 of epoch 1, not the epoch's
    start) and logs the uninterrupted run's losses and epoch summaries, bit for bit."""
    args = dict(batch_size=1, epochs=2, save_every=3)
    calls, kills, rng = [], [], {}

    def killed(state, *a, **k):
        calls.append(state.step)
        # the random stream each iteration starts from (LPIPS dropout draws from it)
        rng.setdefault(state.step, []).append(torch.get_rng_state())
        if state.step == 6 and kill:
            kills.append(state.step)
            raise KeyboardInterrupt
        return train_step(state, *a, **k)
    monkeypatch.setattr(engine_train, "train_step", killed)
    kill = False
    assert _step4(_args(world, tmp_path / "full", **args), monkeypatch) == 0
    capsys.readouterr()
    kill = True
    assert _step4(_args(world, tmp_path / "resumed", **args), monkeypatch) == 130
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)["state"]
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 2, 6)
    assert ckpt["global_cache"]["filled"].all()               # every image seen in epoch 0
    calls.clear()
    kill = False
    assert _step4(_args(world, tmp_path / "resumed", **args), monkeypatch) == 0
    assert calls == [6, 7]                                    # only the epoch's last 2 batches
    for step in range(8):     # full run, killed run (steps 0-6), resumed run (steps 6, 7)
        assert len(rng[step]) == (3 if step == 6 else 2)
        assert all(torch.equal(r, rng[step][0]) for r in rng[step]), step
    assert "resuming from" in (err := capsys.readouterr().err)
    assert "epoch 1 (batch 2 of the epoch), iteration 6" in err
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _records(resumed, "train") == _records(full, "train")
    assert _records(resumed, "epoch") == _records(full, "epoch")
    a, b = (load_tokenizer(d, clip=load_clip(world["clip"])).state_dict() for d in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
