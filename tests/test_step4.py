"""Tokenizer training: frozen parts stay frozen, a tiny model overfits, exact resume, DDP, bad input.

Tiny widths and 32 px images (4x4 token grid) keep these fast on CPU; the code
path is the 128 px one (resolution is a setting of the same architecture).
"""
import json
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
from models.losses import DiscriminatorLoss, GeneratorLoss, LossWeights
from models.tokenizer_io import load_tokenizer
from engine import train as engine_train
from engine.train import (AUTHORS_BATCH, AUTHORS_LR, TrainConfig, amp_dtype, batch_and_lr, build_training, half_clip,
                          train_step)
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
    assert defaults["LR_SCALING"] == "none"
    assert (defaults["LOCAL_CODEBOOK"], defaults["PROJECTOR"], defaults["CROSS_ATTENTION"]) == \
        ("clip", True, True)
    # the library's defaults are the script's: one recipe, whichever way it is built
    config, weights = TrainConfig(), LossWeights()
    pairs = {"EPOCHS": config.epochs, "WARMUP_EPOCHS": config.warmup_epochs, "LR": config.lr,
             "MIN_LR": config.min_lr, "BETAS": config.betas, "ADAM_EPS": config.eps,
             "AMP": config.amp, "DISC_FRESH_FORWARD": config.disc_fresh_forward,
             "LOG_EVERY": config.log_every, "CHANNELS_LAST": config.channels_last,
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
    assert batch_and_lr(8, 1, 4.5e-4) == (8, 4.5e-4)
    assert batch_and_lr(8, 8, 4.5e-4) == (1, 4.5e-4)           # 8 GPUs: still the authors' batch
    assert batch_and_lr(64, 8, 4.5e-4, "linear") == (8, pytest.approx(8 * 4.5e-4))
    assert batch_and_lr(32, 2, 4.5e-4, "sqrt") == (16, pytest.approx(2 * 4.5e-4))
    with pytest.raises(V2LError, match="multiple of 4"):
        batch_and_lr(6, 4, 4.5e-4)
    with pytest.raises(V2LError, match="--lr_scaling"):
        batch_and_lr(8, 1, 4.5e-4, "cubic")


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
           "--standalone", str(SCRIPT), *_args(world, out, epochs=2, batch_size=4)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "global batch 4 (2 process(es) x 2), learning rate 0.00045" in res.stderr
    m = read_manifest(out, "tokenizer")
    assert m["info"]["world"] == 2 and m["info"]["iterations"] == 2   # 4 images / (2 ranks x 2)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 2
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
