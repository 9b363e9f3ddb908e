"""Every artifact kind in one place: its stage id, the command that makes it, and its directory.

A stage id is what a manifest's ``"stage"`` says, what a consumer checks with
``read_manifest(dir, VOCAB)`` (which also names ``VOCAB.script`` in its error),
what ``run.sh`` asks about (``python -m utils.pipeline check vocab ARGS``) and
where ``utils/summary.py`` looks. This module is data only: it imports nothing
of the project. A new stage is one ``Stage(...)`` line here
(plus, for a pipeline stage, its entry in ``PIPELINE`` and its command in run.sh).

``out_dir`` is the directory under run.sh's ``OUT``; a script's own default is
``out/<out_dir>`` (tests/test_cli.py checks that the two agree).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    id: str        # the manifest's "stage"
    script: str    # the command that makes it (named in "run ... first" errors)
    out_dir: str   # its directory under run.sh's OUT (scripts default to out/<out_dir>)
    title: str     # run.sh's label for it
    what: str = ""  # what the artifact holds (run.sh --help)

    def __str__(self) -> str:
        return self.id


VOCAB = Stage("vocab", "step1_expand_vocabulary.py", "vocab", "step 1: expand vocabulary",
              "subword, bigram, trigram of every LLM token")
CODEBOOK = Stage("codebook", "step2_codebook_embedding.py", "codebook", "step 2: codebook embedding",
                 "CLIP text embeddings (local codebook, global candidates)")
GLOBAL = Stage("global", "step3_codebook_filtering.py", "global", "step 3: global filtering",
               "global candidates CLIP's image tower hits often")
TOKENIZER = Stage("tokenizer", "step4_train_tokenizer.py", "tokenizer", "step 4: train tokenizer",
                  "the trained V2L tokenizer")
EVAL_RECONSTRUCTION = Stage("eval_reconstruction", "eval_reconstruction.py", "eval_reconstruction",
                            "eval: reconstruction", "PSNR, SSIM, LPIPS, FID, IS, codebook use")
EVAL_UNDERSTANDING = Stage("eval_understanding", "eval_understanding.py", "eval_understanding",
                           "eval: understanding", "few-shot classification with the frozen LLM")
EVAL_DENOISING = Stage("eval_denoising", "eval_denoising.py", "eval_denoising", "eval: denoising",
                       "inpainting, outpainting, deblurring, rotation, shift")
EVAL_CAPTIONING = Stage("eval_captioning", "eval_captioning.py", "eval_captioning",
                        "eval: captioning", "captions by the frozen LLM, CIDEr-D and BLEU-4")
EVAL_VQA = Stage("eval_vqa", "eval_vqa.py", "eval_vqa", "eval: vqa",
                 "visual question answering by the frozen LLM, VQAv2 accuracy")
VOCO = Stage("voco", "step5_train_voco.py", "voco", "step 5: train VoCo",
             "VoCo embeddings + LoRA that compress an image's words into k KV positions")
EVAL_COMPRESSION = Stage("eval_compression", "eval_compression.py", "eval_compression",
                         "eval: compression", "few-shot with compressed images, retention per k")
VOCO_VIDEO = Stage("voco_video", "step6_train_video.py", "voco_video", "step 6: train VoCo on video",
                   "VoCo weights continued on video QA (each frame compressed on its own)")
EVAL_VIDEO = Stage("eval_video", "eval_video.py", "eval_video", "eval: video",
                   "video QA through compressed frames: upper, lower, none, last, shuffled, VoCo per k")
LLAVA_VOCO = Stage("llava_voco", "step7_train_llava_voco.py", "llava_voco",
                   "step 7: train VoCo on LLaVA",
                   "VoCo embeddings + LoRA (or a fine-tuned LLM) trained on LLaVA's conversations")
EVAL_LLAVA = Stage("eval_llava", "eval_llava.py", "eval_llava", "eval: LLaVA benchmarks",
                   "LLaVA benchmark answers per condition, scores, retention per k, cost")

# the pipeline, in run.sh's order
PIPELINE = (VOCAB, CODEBOOK, GLOBAL, TOKENIZER, EVAL_RECONSTRUCTION, EVAL_UNDERSTANDING,
            EVAL_DENOISING, EVAL_CAPTIONING, EVAL_VQA, VOCO, EVAL_COMPRESSION, VOCO_VIDEO, EVAL_VIDEO,
            LLAVA_VOCO, EVAL_LLAVA)
# pipeline stages run.sh runs only when asked: captioning with COCO, VQA with VQA and COCO (always
# in the demo), VoCo with VOCO=true, video with its datasets, LLaVA with LLAVA and its data
OPTIONAL = (EVAL_CAPTIONING, EVAL_VQA, VOCO, EVAL_COMPRESSION, VOCO_VIDEO, EVAL_VIDEO, LLAVA_VOCO,
            EVAL_LLAVA)

# artifacts inside a stage's directory, and the demo's inputs (made by demo/setup.py)
EVAL_UNDERSTANDING_SETTING = Stage("eval_understanding_setting", "eval_understanding.py",
                                   "eval_understanding/<setting>", "eval: understanding, one setting")
DEMO = "python -m demo.setup"
DEMO_DATA = Stage("demo_data", DEMO, "demo/data", "demo: images")
DEMO_LLM = Stage("demo_llm", DEMO, "demo/llm", "demo: stand-in LLM")
DEMO_VOCAB_IDS = Stage("demo_vocab_ids", DEMO, "demo/vocab_ids", "demo: vocabulary ids")
DEMO_CLIP = Stage("demo_clip", DEMO, "demo/clip", "demo: stand-in CLIP")
DEMO_VIDEO = Stage("demo_video", "python -m demo.video", "demo/video", "demo: clips")
DEMO_LLAVA_DATA = Stage("demo_llava_data", "python -m demo.llava", "demo/llava_data",
                        "demo: LLaVA data")
DEMO_LLAVA_PROJECTOR = Stage("demo_llava_projector", "python -m demo.llava", "demo/llava_projector",
                             "demo: LLaVA projector")

ALL = PIPELINE + (EVAL_UNDERSTANDING_SETTING, DEMO_DATA, DEMO_LLM, DEMO_VOCAB_IDS, DEMO_CLIP,
                                                DEMO_VIDEO, DEMO_LLAVA_DATA, DEMO_LLAVA_PROJECTOR)
BY_ID = {s.id: s for s in ALL}
assert len(BY_ID) == len(ALL), "two stages share an id"


def stage_id(stage: Stage | str) -> str:
    return stage.id if isinstance(stage, Stage) else stage


def producer(stage: Stage | str) -> str | None:
    """The command that makes a stage's artifact, or None for an unregistered id."""
    s = BY_ID.get(stage_id(stage))
    return s.script if s else None
