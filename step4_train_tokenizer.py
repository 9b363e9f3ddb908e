"""Step 4: train the V2L tokenizer (encoder, local quantiser projector, decoder).

Images (128 px in [-1, 1], plus CLIP's view for the global tokens) are
reconstructed through the frozen local codebook (step 2) and the frozen
filtered global codebook (step 3). Loss: L1 + VQ + 0.1 LPIPS + adaptive-weighted
PatchGAN hinge loss from iteration DISC_START on; Adam (0.5, 0.9, eps 1e-7), 5
warm-up epochs then half-cycle cosine, per iteration. CLIP and both codebooks
stay frozen.

As the authors run it, by default: BATCH_SIZE 8 images per process (their script: 8
per GPU) at lr 4.5e-4, fp16 autocast with a GradScaler and CLIP in fp16 (recorded in
tokenizer.pt, so that evaluations run CLIP alike on a GPU), LPIPS dropout active, the
discriminator step on a fresh forward of the updated tokenizer, its BatchNorm per process.
The global batch is BATCH_SIZE x the number of processes; LR stays as given
(LR_SCALING none) or scales by global batch / 8, the authors' one GPU x 8 (linear, or its
square root). Both are printed at start-up. SYNC_BN synchronises the discriminator's
BatchNorm over the processes (GPUs only). Under fp16 an iteration whose scaled loss or
gradients overflow is skipped and the loss scale backs off; training stops with one line
when that persists, or at once on a non-finite loss without loss scaling.
Their ablations are flags: --local_codebook random|trained, --projector false,
--cross_attention false.

Each image's global tokens are computed by CLIP once (the first time the image is seen)
and reused for the rest of the run (engine/global_cache.py: the same tokens, CLIP being
frozen and the crop fixed); the checkpoint keeps them.

Writes OUT_DIR: checkpoints/last.pt every epoch and every SAVE_EVERY iterations (a rerun of
the same command resumes from it exactly, also part-way through an epoch; a rerun with other
settings stops with one line naming them), samples/epoch_NNNN.png (originals over
reconstructions), log.jsonl and tb/ (every loss term), and at the end
tokenizer.pt (self-contained, models.tokenizer_io.load_tokenizer) and manifest.json.

    python step4_train_tokenizer.py --data_dir data/imagenet --clip ViT-L-14 \
        --clip_pretrained ViT-L-14.pt --clip_allow_unsafe true
    torchrun --nproc_per_node 8 step4_train_tokenizer.py ...   # 8 per GPU: global batch 64
"""
import sys
from pathlib import Path

import torch

from data.images import ImageFolderDataset
from engine.train import (AUTHORS_BATCH, AUTHORS_LR, RunLog, TrainConfig, batch_and_lr, build_training,
                          make_loader, reconstruct_samples, resume, save_checkpoint,
                          seed_everything, train_one_epoch, use_global_cache)
from models.clip import load_clip
from models.losses import DiscriminatorLoss, GeneratorLoss, LossWeights, load_lpips
from engine.tokenizer_build import tokenizer_from_artifacts
from models.tokenizer_io import save_tokenizer
from utils import dist
from utils.artifacts import read_manifest, require_input, run_key, write_manifest
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import CODEBOOK, GLOBAL, TOKENIZER

DATA_DIR = "/data/imagenet"  # training images in ImageNet layout (<data_dir>/<split>/<class>/<images>)
SPLIT: str | None = "train"  # sub-folder of DATA_DIR to train on (none: DATA_DIR itself)
CODEBOOK_DIR = "out/codebook"  # step-2 artifact (local codebook)
GLOBAL_DIR = "out/global"  # step-3 artifact (filtered global codebook)
OUT_DIR = "out/tokenizer"  # where the tokenizer artifact is written (and resumed from)
CLIP = "ViT-L-14"  # the CLIP of step 2: open_clip model directory or architecture name
CLIP_PRETRAINED = None  # weights for a named CLIP: OpenAI ViT-L-14.pt or an open_clip .bin/.safetensors
CLIP_ALLOW_UNSAFE = False  # allow pickled CLIP files (OpenAI's TorchScript ViT-L-14.pt); only if trusted
EPOCHS = 100  # training epochs
WARMUP_EPOCHS = 5  # linear learning-rate warm-up epochs (then half-cycle cosine to MIN_LR)
BATCH_SIZE = 8  # images per iteration per process (the authors: 8 per GPU); global batch = BATCH_SIZE x processes
LR = 4.5e-4  # peak learning rate of the tokenizer and the discriminator (the authors' at batch 8)
LR_SCALING = "none"  # "none" keeps LR whatever the global batch; "linear" / "sqrt": LR x (global batch / 8), or its square root
MIN_LR = 0.0  # learning rate at the end of the cosine
BETAS = (0.5, 0.9)  # Adam betas
ADAM_EPS = 1e-7  # Adam epsilon (the authors'; PyTorch's default is 1e-8)
CODEBOOK_WEIGHT = 1.0  # weight of the VQ loss
L2_WEIGHT = 0.0  # weight of a squared-error term added to L1 (0: the authors'; the demo uses 4, see README)
PERCEPTUAL_WEIGHT = 0.1  # weight of LPIPS (0: train without it, no VGG16 weights needed)
LPIPS_DROPOUT = True  # LPIPS dropout active while training, as in the authors' code (false: the metric as calibrated)
VGG_PATH = None  # vgg16-397923af.pth for LPIPS (none: the torch hub cache, <TORCH_HOME>/hub/checkpoints)
DISC_WEIGHT = 0.75  # multiplies the adaptive GAN weight (0: no GAN)
DISC_START = 10000  # iteration at which the GAN term and the discriminator's training start
DISC_NDF = 64  # discriminator base channels
DISC_LAYERS = 2  # discriminator depth (PatchGAN n_layers)
DISC_FRESH_FORWARD = True  # discriminator step on a new forward after the generator update, as the authors (false: reuse)
RESOLUTION = 128  # image size the tokenizer reconstructs
GLOBAL_TOPK = 21  # global tokens per image (k)
CH = 128  # encoder/decoder base channels (a multiple of 32)
CH_MULT: tuple[int, ...] = (1, 2, 2, 4)  # channel multiplier per level
NUM_RES_BLOCKS = 2  # residual blocks per level
Z_CHANNELS = 256  # encoder output channels
CROSS_HEADS = 8  # decoder cross-attention heads
CROSS_HEAD_DIM = 512  # decoder cross-attention head dimension
BETA = 0.33  # weight of the codebook term inside the VQ loss
ENTROPY_WEIGHT = 0.0  # code-usage entropy penalty on the local quantiser against codebook collapse (0: the authors')
ENTROPY_TEMPERATURE = 0.01  # its soft-assignment temperature (in squared-distance units)
# the authors' ablations (defaults: the paper's model)
LOCAL_CODEBOOK = "clip"  # local codebook: clip (frozen CLIP text embeddings), random (frozen random), trained
PROJECTOR = True  # the trainable Linear(D, D) on the local codebook (false: codes are the codebook itself)
CROSS_RESIDUAL = False  # add the decoder's cross-attention output to its features (the authors': it replaces them)
CROSS_NULL = False  # a learned null key (zero value) in the decoder's cross-attention: a position may ignore the global words (false: the authors')
CROSS_ATTENTION = True  # the decoder attends to the global tokens (false: decoder without cross-attention)
AMP = "fp16"  # mixed precision: fp16 (GPU; a GradScaler, CLIP in fp16: the authors'), bf16 (also a CPU with native bf16) or none
CHANNELS_LAST = False  # NHWC memory layout for the convolutions (often faster on GPUs)
CUDNN_BENCHMARK = True  # GPUs: cuDNN times its convolution algorithms once and keeps the fastest (false: its heuristics, run-to-run reproducible kernels)
FIND_UNUSED_PARAMETERS = False  # DDP option; only needed for architectures with unused branches
SYNC_BN = False  # the discriminator's BatchNorm as SyncBatchNorm over the processes (GPUs; false: per process, the authors')
NUM_WORKERS = 8  # image-decoding worker processes per rank
SEED = 0  # seed of the initialisation, the data order and every random stream
MAX_IMAGES: int | None = None  # train on the first N images only (none: all)
MAX_STEPS_PER_EPOCH: int | None = None  # cut each epoch after N iterations (quick runs; none: full epochs)
LOG_EVERY = 50  # iterations between log records (log.jsonl, TensorBoard) and divergence checks
SAVE_EVERY = 2000  # iterations between checkpoints inside an epoch (0: at epoch ends only)
SAVE_EVERY_EPOCH = 10  # also keep checkpoints/epoch_NNNN.pt every N epochs (0: only last.pt)
N_SAMPLES = 8  # images in each epoch's reconstruction grid
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu

settings = configure(globals())


def check_inputs(clip_ident: str) -> tuple[dict, dict]:
    """The finished codebook and global artifacts, made from each other and with this CLIP."""
    codebook_manifest = read_manifest(CODEBOOK_DIR, CODEBOOK)
    global_manifest = read_manifest(GLOBAL_DIR, GLOBAL)
    require_input(global_manifest, "codebook", codebook_manifest, f"global codebook {GLOBAL_DIR}")
    embedded_with = codebook_manifest["info"].get("clip")
    if embedded_with != clip_ident:
        raise V2LError(f"{CODEBOOK_DIR} was embedded with CLIP '{embedded_with}' but "
                       f"--clip/--clip_pretrained give '{clip_ident}'; pass the CLIP of step 2")
    return codebook_manifest, global_manifest


def sample_batch(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first n readable images of the data set (the same ones every epoch)."""
    items = []
    for i in range(len(dataset)):
        if len(items) == n:
            break
        item = dataset[i]
        if item is not None:
            items.append(item["image"])
    if not items:
        return None
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def main():
    ddp = dist.init(DEVICE, OUT_DIR)
    global_batch, lr = batch_and_lr(BATCH_SIZE, ddp.world, LR, LR_SCALING)
    seed_everything(SEED, ddp.rank)
    out, ckpt_dir = Path(OUT_DIR), Path(OUT_DIR) / "checkpoints"
    clip = load_clip(CLIP, CLIP_PRETRAINED, device=ddp.device, allow_unsafe=CLIP_ALLOW_UNSAFE)
    codebook_manifest, global_manifest = check_inputs(clip.ident)
    dataset = ImageFolderDataset(DATA_DIR, SPLIT, transform=clip.image_views(RESOLUTION),
                                 max_images=MAX_IMAGES)
    tokenizer = tokenizer_from_artifacts(
        CODEBOOK_DIR, GLOBAL_DIR, clip, resolution=RESOLUTION, ch=CH, ch_mult=tuple(CH_MULT),
        num_res_blocks=NUM_RES_BLOCKS, z_channels=Z_CHANNELS, global_topk=GLOBAL_TOPK,
        cross_heads=CROSS_HEADS, cross_head_dim=CROSS_HEAD_DIM, beta=BETA,
        entropy_weight=ENTROPY_WEIGHT, entropy_temperature=ENTROPY_TEMPERATURE,
        local_codebook=LOCAL_CODEBOOK, projector=PROJECTOR, cross_attention=CROSS_ATTENTION,
        cross_residual=CROSS_RESIDUAL, cross_null=CROSS_NULL,
        clip_spec=CLIP, clip_pretrained=CLIP_PRETRAINED)
    weights = LossWeights(codebook_weight=CODEBOOK_WEIGHT, l2_weight=L2_WEIGHT,
                          perceptual_weight=PERCEPTUAL_WEIGHT,
                          disc_weight=DISC_WEIGHT, disc_start=DISC_START)
    perceptual = load_lpips(ddp.device, VGG_PATH) if PERCEPTUAL_WEIGHT > 0 else None
    state = build_training(
        tokenizer, GeneratorLoss(weights, perceptual, perceptual_dropout=LPIPS_DROPOUT),
        DiscriminatorLoss(DISC_NDF, DISC_LAYERS),
        TrainConfig(epochs=EPOCHS, warmup_epochs=WARMUP_EPOCHS, lr=lr, min_lr=MIN_LR,
                    betas=tuple(BETAS), eps=ADAM_EPS, amp=AMP,
                    disc_fresh_forward=DISC_FRESH_FORWARD, log_every=LOG_EVERY,
                    max_steps_per_epoch=MAX_STEPS_PER_EPOCH,
                    find_unused_parameters=FIND_UNUSED_PARAMETERS, channels_last=CHANNELS_LAST,
                    cudnn_benchmark=CUDNN_BENCHMARK, save_every=SAVE_EVERY, sync_bn=SYNC_BN),
        ddp)
    use_global_cache(state, dataset)
    # a checkpoint resumes only the run of these settings on these input artifacts
    key = run_key(settings, codebook=CODEBOOK_DIR, **{"global": GLOBAL_DIR})
    resume(state, ckpt_dir, ddp, key, log_path=out / "log.jsonl")
    if ddp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"training on {len(dataset)} images, {ddp.world} process(es), "
              f"{sum(p.numel() for p in tokenizer.trainable_parameters()) / 1e6:.1f}M trainable "
              f"parameters, codebooks V={tokenizer.config.n_local} M={tokenizer.config.n_global}",
              file=sys.stderr)
        print(f"global batch {global_batch} ({ddp.world} process(es) x {BATCH_SIZE}), "
              f"learning rate {lr:.3g} (--lr {LR:.3g}, --lr_scaling {LR_SCALING}; the authors: "
              f"global batch {AUTHORS_BATCH} on one GPU, {AUTHORS_LR:g})", file=sys.stderr)
    loader = make_loader(dataset, BATCH_SIZE, NUM_WORKERS, SEED, ddp)
    samples = sample_batch(dataset, N_SAMPLES) if ddp.is_main else None
    run_log = RunLog(out, ddp)
    while state.epoch < EPOCHS:
        epoch = state.epoch
        summary = train_one_epoch(state, loader, ddp, run_log,
                                  save=lambda: save_checkpoint(state, ckpt_dir, ddp, key))
        if ddp.is_main:
            words = reconstruct_samples(state, *samples, out / "samples" / f"epoch_{epoch:04d}.png") \
                if samples else []
            run_log.write({"step": state.step, "epoch": epoch, **summary}, kind="epoch")
            print(f"epoch {epoch}: loss {summary['loss']:.4f}, L1 {summary['l1']:.4f}, codebook "
                  f"usage {summary['codebook_used']}/{summary['codebook_size']}", file=sys.stderr)
            for i, image_words in enumerate(words[:4]):
                print(f"  image {i} global words: {' | '.join(image_words)}", file=sys.stderr)
        save_checkpoint(state, ckpt_dir, ddp, key, keep_every=SAVE_EVERY_EPOCH)
    run_log.close()
    if ddp.is_main:
        save_tokenizer(tokenizer, out / "tokenizer.pt")
        write_manifest(out, TOKENIZER, settings, ["tokenizer.pt", "log.jsonl"],
                       inputs={"codebook": CODEBOOK_DIR, "global": GLOBAL_DIR},
                       info={"epochs": state.epoch, "iterations": state.step, "world": ddp.world,
                             "global_batch": global_batch, "clip": clip.ident,
                             "clip_precision": tokenizer.config.clip_precision,
                             "images": len(dataset)})
        print(f"wrote {out}/tokenizer.pt ({state.step} iterations)", file=sys.stderr)
    dist.barrier(ddp)
    dist.shutdown(ddp)


if __name__ == "__main__":
    run_main(main, TOKENIZER, settings)
