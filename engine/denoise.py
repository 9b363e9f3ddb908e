"""Image restoration by a frozen LLM reading and writing local tokens in-context.

Protocol (the authors' evaluation; the paper's "denoising" tasks): an image's
16x16 local tokens are a 256-token sequence in raster order. The clean image
gives the target sequence, the corrupted image (blurred, rotated, shifted)
another one. Ten in-context examples are noisy copies of the target: in copy r
a fraction NOISE_RATES[r] of the positions (the same positions and the same
random ids in both sequences) is replaced by random codebook ids. The LLM then
restores the target ``step`` tokens at a time, reading

    <bos>Learning a new language and predict the {step} tokens following the examples.\\n
    ###\\nInput: < {example input} >\\nOutput: {example output}       (x10)
    ###\\nInput: < {query input} >\\nOutput:

- in/outpainting (centre 8x8 cells / bottom half to predict): input = the
  ``window`` tokens preceding the chunk, output = the chunk; the query's window
  holds the known tokens and the ones predicted so far, so the chunks are
  predicted one after the other;
- deblurring, rotation, shift (every cell predicted): input = the corrupted
  image's tokens at the chunk, output = the clean tokens there; the chunks do
  not depend on one another and run as one batch.

Every predicted id is one of the local codebook's (the LLM's other logits are
masked), so the grid always decodes. The global tokens come from the clean
image's CLIP view, as in the authors' script.

Protocols (``PROTOCOLS``): "authors" reproduces their script where it matters
for the numbers; "consistent" is the sound alternative.

- images: authors: the clean (and shifted) image is the picture's shorter side
  resized straight to 128 px (bilinear, no anti-aliasing) and centre (bottom-right)
  cropped to 128. consistent: the view the tokenizer was trained on, CLIP's 224
  centre (bottom-right) crop resized to 128, the same pixels as the CLIP view.
- noise count: authors: int(rate x (k + N)) positions of N local ones (k global
  tokens; 138 at rate 0.5 with k = 21), since their sequence holds the global
  tokens too. consistent: int(rate x N), the rate being the share of local
  tokens hit.

Two fixes of their script are kept under both protocols:
- LOCAL POSITIONS: the noise positions are drawn over the N local positions
  for any k (theirs start at a hard-coded 21, right only for k = 21);
- CODEBOOK IDS: the random ids are local codebook ids (LLM tokens the
  tokenizer can decode), not arbitrary vocabulary ids.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from data.transforms import clip_crop
from engine.fewshot import check_prompt_length, context_length
from engine.greedy import BatchedGreedy
from models.llm import encode_segment
from utils.errors import V2LError

TASKS = ("inpainting", "outpainting", "deblurring", "rotation", "shift")
WINDOW_TASKS = ("inpainting", "outpainting")
NOISE_RATES = (0.50, 0.47, 0.44, 0.41, 0.38, 0.35, 0.32, 0.29, 0.26, 0.23)
BLUR_KERNELS = (5, 7, 9, 11)   # the authors' GaussianBlur(blur_limit=(5, 11)): a random odd size
# The restoration prompt's own strings (the authors' wording; the few-shot prompt has its own).
INSTRUCTION = "Learning a new language and predict the {step} tokens following the examples.\n"
IN_TEXT = "###\nInput: < "
OUT_TEXT = " >\nOutput: "
UNKNOWN = -1                   # marks the cells to predict in the query sequence
PROTOCOLS = ("authors", "consistent")   # see the module docstring


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise V2LError(f"unknown denoising protocol {protocol!r}; --protocol takes "
                       f"{' or '.join(PROTOCOLS)}")
    return protocol


def noise_count(rate: float, n_local: int, n_global: int, protocol: str = "authors") -> int:
    """How many of the n_local positions a noisy copy replaces (see the module docstring)."""
    base = n_local + n_global if check_protocol(protocol) == "authors" else n_local
    return min(n_local, int(rate * base))


def check_tasks(tasks) -> list[str]:
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise V2LError(f"unknown denoising task(s) {bad}; --tasks takes any of: {', '.join(TASKS)}")
    return tasks


def prediction_mask(task: str, grid: int = 16) -> torch.Tensor:
    """bool [grid, grid]: the cells the LLM predicts (in/outpainting: the missing ones)."""
    check_tasks(task)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    if task == "inpainting":
        q = grid // 4
        mask[q:grid - q, q:grid - q] = True
    elif task == "outpainting":
        mask[grid // 2:] = True
    else:
        mask[:] = True
    return mask


def blur_sigma(kernel: int) -> float:
    """OpenCV's sigma for a Gaussian kernel given only its size (the authors' blur)."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def check_blur_kernels(kernels) -> tuple[int, ...]:
    """The deblurring kernel sizes as ints, refused unless each is odd and at least 3 (checked
    once by the script, not per image)."""
    kernels = tuple(int(k) for k in kernels)
    if not kernels or any(k < 3 or k % 2 == 0 for k in kernels):
        raise V2LError(f"blur kernels {list(kernels)}: each must be an odd size of at least 3 "
                       f"(the authors': {' '.join(map(str, BLUR_KERNELS))})")
    return kernels


def corrupt_image(task: str, x: torch.Tensor, shifted: torch.Tensor, rng: random.Random,
                  grid: int = 16, blur_kernels=BLUR_KERNELS) -> torch.Tensor:
    """The corrupted view of one image x [3, H, W] in [-1, 1] (the "corrupted" row; the
    "baseline" row is its encoding decoded). ``shifted``: the bottom-right crop of the same picture (the shift task).
    In/outpainting grey out the cells to predict; deblurring blurs with a Gaussian of a size
    drawn from ``blur_kernels``."""
    if task == "deblurring":
        k = rng.choice(blur_kernels)
        return TF.gaussian_blur(x, [k, k], [blur_sigma(k)] * 2)
    if task == "rotation":
        return torch.rot90(x, 1, dims=(-2, -1))      # 90 degrees counter-clockwise
    if task == "shift":
        return shifted
    cell = x.shape[-1] // grid
    keep = ~prediction_mask(task, grid).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return x * keep.to(x.dtype)


def corrupt_batch(task: str, x: torch.Tensor, shifted: torch.Tensor, indices: list[int],
                  seed: int, grid: int = 16, blur_kernels=BLUR_KERNELS) -> torch.Tensor:
    """``corrupt_image`` over a batch; image i's randomness depends only on (seed, index)."""
    return torch.stack([corrupt_image(task, xi, si, random.Random(f"{seed}-{i}"), grid, blur_kernels)
                        for xi, si, i in zip(x, shifted, indices)])


# The rows of the evaluation, per task. All but "corrupted" are decoded by the tokenizer with
# the clean image's global tokens (the authors decode the restored grid so), so baseline,
# restored and ceiling differ only in their local tokens.
VARIANTS = ("corrupted",   # the corrupted image itself (pixel metrics only)
            "baseline",    # the corrupted image encoded and decoded by the same tokenizer
            "restored",    # the LLM's restored local tokens, decoded
            "ceiling")     # the clean image encoded and decoded (the best a restoration decodes to)


@torch.no_grad()
def encode_task(tokenizer, task: str, x: torch.Tensor, x_clip: torch.Tensor, shifted: torch.Tensor,
                indices: list[int], seed: int, blur_kernels=BLUR_KERNELS) -> dict[str, torch.Tensor]:
    """The tokens of a batch for one task: ``global_idx`` [B, k] (the clean CLIP view's, as
    the authors), ``clean`` [B, N] (the target) and ``corrupt`` [B, N] (the corrupted image
    through the same tokenizer's encoder: the baseline, and what the LLM reads for
    deblurring, rotation and shift)."""
    global_idx, clean = tokenizer.encode(x, x_clip)
    corrupt = tokenizer.local_tokens(corrupt_batch(task, x, shifted, indices, seed,
                                                   tokenizer.config.grid, blur_kernels))
    return {"global_idx": global_idx, "clean": clean.flatten(1), "corrupt": corrupt.flatten(1)}


def query_tokens(task: str, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """The sequence the LLM reads: for in/outpainting the clean tokens (their known cells; the
    ones to predict are never read), as the authors; otherwise the corrupted image's."""
    return clean if task in WINDOW_TASKS else corrupt


@torch.no_grad()
def variant_images(tokenizer, task: str, x: torch.Tensor, shifted: torch.Tensor,
                   indices: list[int], seed: int, tokens: dict,
                   blur_kernels=BLUR_KERNELS) -> dict[str, torch.Tensor]:
    """Each variant's images [B, 3, R, R] in [-1, 1]; ``tokens``: global_idx, clean, corrupt,
    pred ([B, N] local ids) of the batch."""
    g = tokenizer.config.grid
    global_idx = tokens["global_idx"].to(x.device)
    decode = lambda ids: tokenizer.decode(ids.reshape(-1, g, g).to(x.device), global_idx)  # noqa: E731
    return {"corrupted": corrupt_batch(task, x, shifted, indices, seed, g, blur_kernels),
            "baseline": decode(tokens["corrupt"]), "restored": decode(tokens["pred"]),
            "ceiling": decode(tokens["clean"])}


def token_hits(task: str, tokens: dict, grid: int = 16) -> dict[str, int]:
    """Cells to predict whose token equals the clean image's: the baseline (the corrupted
    image's tokens) and the restored ones, summed over the batch."""
    cells = prediction_mask(task, grid).flatten()
    target = tokens["clean"][:, cells]
    return {v: int((tokens[k][:, cells] == target).sum())
            for v, k in (("baseline", "corrupt"), ("restored", "pred"))}


class DenoiseViews:
    """PIL -> (clean view, CLIP view, shifted view); the clean and shifted views at the
    tokenizer's resolution ``out_size`` (128 px in the paper).

    The CLIP view is always CLIP's own preprocessing (the global tokens'). The
    clean and shifted views follow ``protocol`` (module docstring): the shifted one is the
    bottom-right square of the same resized picture instead of its centre (a
    square picture has no shift)."""

    def __init__(self, clip, out_size: int = 128, protocol: str = "authors"):
        self.protocol = check_protocol(protocol)
        self.views = clip.image_views(out_size)
        self.clip_view = clip.image_view()
        self.size, self.out_size = clip.image_size, out_size
        self.resize = clip_crop(clip.image_size, clip.interpolation).transforms[0]

    def _authors(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        big = TF.resize(TF.to_tensor(image), self.out_size,
                        interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        x = TF.center_crop(big, [self.out_size, self.out_size])
        corner = big[:, -self.out_size:, -self.out_size:]
        return x.clamp(0, 1) * 2 - 1, corner.clamp(0, 1) * 2 - 1

    def __call__(self, image):
        if self.protocol == "authors":
            x128, shifted = self._authors(image)
            return x128, self.clip_view(image), shifted
        x128, x_clip = self.views(image)
        big = TF.to_tensor(self.resize(image))
        corner = big[:, -self.size:, -self.size:]
        small = F.interpolate(corner[None], size=(self.out_size, self.out_size), mode="bilinear",
                              align_corners=False)[0]
        return x128, x_clip, small.clamp(0, 1) * 2 - 1


def codebook_vocab_mask(llm_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: True at the LLM ids that are local codebook rows."""
    if int(llm_ids.max()) >= vocab_size:
        raise V2LError(f"the tokenizer's codebook holds LLM id {int(llm_ids.max())} but the LLM has "
                       f"{vocab_size} tokens; use the LLM the vocabulary was built from")
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[llm_ids.cpu()] = True
    return mask


def noisy_copies(clean: torch.Tensor, corrupt: torch.Tensor, ids: torch.Tensor,
                 gen: torch.Generator, rates=NOISE_RATES, n_global: int = 0,
                 protocol: str = "authors") -> tuple[torch.Tensor, torch.Tensor]:
    """For one image's local sequences [N]: ``len(rates)`` copies of each [R, N] where the
    same ``noise_count(rate, N, n_global, protocol)`` positions (LOCAL POSITIONS) hold the
    same random ids drawn from ``ids`` (CODEBOOK IDS) in both."""
    n = clean.numel()
    out_clean = clean.repeat(len(rates), 1)
    out_corrupt = corrupt.repeat(len(rates), 1)
    for r, rate in enumerate(rates):
        pos = torch.randperm(n, generator=gen)[: noise_count(rate, n, n_global, protocol)]
        new = ids[torch.randint(len(ids), (len(pos),), generator=gen)]
        out_clean[r, pos] = new
        out_corrupt[r, pos] = new
    return out_clean, out_corrupt


def noisy_batch(clean: torch.Tensor, query: torch.Tensor, ids: torch.Tensor, indices: list[int],
                seed: int, rates=NOISE_RATES, n_global: int = 0,
                protocol: str = "authors") -> tuple[torch.Tensor, torch.Tensor]:
    """``noisy_copies`` of B images ([B, N] each -> [B, R, N] each), seeded per image index."""
    pairs = [noisy_copies(c, q, ids, torch.Generator().manual_seed(seed * 1_000_003 + i), rates,
                          n_global, protocol)
             for c, q, i in zip(clean, query, indices)]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def chunk_starts(mask: torch.Tensor, step: int) -> list[int]:
    """Raster positions where a chunk of ``step`` predicted tokens starts."""
    flat, starts, p = mask.flatten().tolist(), [], 0
    while p < len(flat):
        if flat[p]:
            starts.append(p)
            p += step
        else:
            p += 1
    return starts


class DenoisePrompter:
    """Token-id prompts of the restoration task (segments tokenised once)."""

    def __init__(self, text_tokenizer, step: int):
        self.text_tokenizer = text_tokenizer
        enc = lambda s: encode_segment(text_tokenizer, s)  # noqa: E731  (Meta's encode of a segment)
        bos = [text_tokenizer.bos_token_id] if text_tokenizer.bos_token_id is not None else []
        self.head = bos + enc(INSTRUCTION.format(step=step))
        self.inp, self.out = enc(IN_TEXT), enc(OUT_TEXT)

    def text(self, ids: list[int]) -> str:
        """What the LLM reads, as text: decoded from the prompt's ids (not re-assembled from
        the strings, so a log shows exactly the tokens that were run)."""
        return self.text_tokenizer.decode(ids)

    def build(self, ex_in: torch.Tensor, ex_out: torch.Tensor, query_in: torch.Tensor) -> list[int]:
        """ex_in [R, a], ex_out [R, b], query_in [a] -> the prompt's ids."""
        ids = list(self.head)
        for i, o in zip(ex_in.tolist(), ex_out.tolist()):
            ids += self.inp + i + self.out + o
        return ids + self.inp + query_in.tolist() + self.out


@torch.no_grad()
def restore(greedy: BatchedGreedy, prompter: DenoisePrompter, task: str,
            query: torch.Tensor, noisy_clean: torch.Tensor, noisy_corrupt: torch.Tensor,
            vocab_mask: torch.Tensor, step: int = 2, window: int = 16, batch_size: int = 64,
            grid: int = 16, prompt_log: list | None = None) -> torch.Tensor:
    """Predict the clean local tokens of B images.

    query: [B, N] sequences the LLM reads (N = grid * grid): the corrupted image's
    tokens, or for in/outpainting the clean ones (their cells to predict are
    blanked here and never read); noisy_*: [B, R, N] from ``noisy_copies``.
    ``prompt_log``: a list that receives the first prompt's ids, as run.
    Returns [B, N]: the known cells kept, the predicted ones filled."""
    mask = prediction_mask(task, grid).flatten()
    starts = chunk_starts(mask, step)
    n = mask.numel()
    work = query.clone()
    if task in WINDOW_TASKS:
        work[:, mask] = UNKNOWN

    def chunk(start: int) -> tuple[int, int, int]:
        end = min(start + step, n)
        return (max(0, start - window), start, end) if task in WINDOW_TASKS else (start, end, end)

    def predict(jobs: list[tuple[int, int]]) -> None:
        """jobs: (image, chunk start); fills ``work`` at those chunks."""
        for lo in range(0, len(jobs), batch_size):
            part = jobs[lo:lo + batch_size]
            prompts = []
            for b, s in part:
                a, e_in, e = chunk(s)
                query = work[b, a:e_in]
                if (query == UNKNOWN).any():
                    raise RuntimeError("restore: a query window reads a cell still unknown")
                prompts.append(prompter.build(noisy_corrupt[b, :, a:e_in] if task not in WINDOW_TASKS
                                              else noisy_clean[b, :, a:e_in],
                                              noisy_clean[b, :, s:e], query))
            check_prompt_length(len(prompts[0]), step, context_length(greedy.model),
                                f"{task} prompt", "--window or --step")
            if prompt_log is not None and not prompt_log:
                prompt_log.append(prompts[0])
            gen = greedy.generate(prompts, step, vocab_mask=vocab_mask)
            for (b, s), toks in zip(part, gen):
                e = chunk(s)[2]
                keep = mask[s:e]
                work[b, s:e][keep] = torch.tensor(toks[: e - s], dtype=work.dtype)[keep]

    images = range(query.shape[0])
    if task in WINDOW_TASKS:
        for s in starts:                      # each chunk reads the ones before it
            predict([(b, s) for b in images])
    else:                                     # independent chunks: one big batch
        predict([(b, s) for b in images for s in starts])
    return work
