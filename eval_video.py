"""Video question answering through VoCo-compressed frames, against its bounds and controls.

Each clip's FRAMES frames are decoded with PyAV and sampled uniformly in time
(data/video.py), made into V2L tokens as step 5 makes an image's (the settings of
the VoCo artifact's voco.json; POSITION_WORDS adds a word naming where a frame's
shape lies, from its local tokens: a demo option), and each frame is compressed
alone into k VoCo positions. The frozen LLM then answers each question reading

- upper: every frame's full tokens, in time order;
- none: no frame (the question alone);
- lower: the frames' blocks from the untrained VoCo weights (the paper's lower bound);
- voco: the trained blocks, in time order, for each k in EVAL_KS;
- last: the last frame's trained block only;
- shuffled: the trained blocks in a seeded order other than time order.

Accuracy is exact match after VQA-style normalisation, with Wilson intervals, per
condition and per question category; retention = (voco - lower) / (upper - lower)
with a paired bootstrap CI. The paper's MSVD-QA / MSRVTT-QA / ActivityNet-QA numbers
are judged by GPT-3.5 (a yes/no and a 0-5 score per answer), which cannot run
offline: the two are not comparable. ANSWER_SET limits decoding to the answers of
the question file ("category": of the question's category), a classification-style
protocol; "open" (the default) generates freely. Cost per clip: tokens and KV bytes
kept, and clips read per second with the full tokens vs the cached blocks (each
distinct frame compressed once per run; compression seconds reported apart).

A question whose clip is not in VIDEO_DIR is skipped and counted; an unreadable or
empty video stops the run with one line naming it; a clip with fewer frames than
FRAMES has its frames repeated in time order (counted).

Under torchrun the clips are dealt out (clip i to rank i % world, with all its
questions), each rank compresses its own clips' frames and answers their
questions, and rank 0 gathers the answers and writes: the results do not depend
on the number of processes.

Writes OUT_DIR: results.json (every condition, per category, retention, cost,
answers), results.md, and manifest.json.

    python eval_video.py --dataset msvd --questions_file MSVD-QA/test_qa.json \
        --video_dir MSVD/YouTubeClips --voco_dir out/voco_video --llm models/llama-2-7b
"""
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.video import SampleStats, load_questions
from engine.fewshot import NameTrie, wilson_interval
from engine.video import (CONDITIONS, QUESTION_TEXT, VIDEO_TEXT, FrameBlocks, VideoPrompter,
                          candidate_sets, clip_words, exact_match, frame_key, load_video_voco,
                          realize_clip)
from engine.voco import greedy, prompt_positions, retention_interval, set_attention, synced_clock
from models.llm import llm_dtype, load_llm
from models.tokenizer_io import load_tokenizer
from models.voco import check_context, kv_bytes_per_token
from utils import dist
from utils.artifacts import MANIFEST, finished_inputs, save_json, write_manifest
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import EVAL_VIDEO
from utils.tables import write_table

TOKENIZER_DIR = "out/tokenizer"   # the trained V2L tokenizer the VoCo weights were trained with
LLM = "/models/llama-2-7b"        # the frozen LLM
LLM_DTYPE = "bf16"                # bf16, fp16 or fp32; a CPU: bf16 where native, else fp32
ATTN = "sdpa"                     # attention: sdpa or eager (flash-attention cannot take VoCo's mask)
VOCO_DIR = "out/voco_video"       # VoCo weights: step 6's (video) or step 5's (images)
DATASET = "msvd"                  # question file layout: msvd, msrvtt or activitynet
QUESTIONS_FILE = "/data/msvd_qa/test_qa.json"  # the released question file (ActivityNet-QA: test_q.json)
ANSWERS_FILE = ""                 # ActivityNet-QA's answers (empty: the questions file with _q -> _a)
MAPPING_FILE = ""                 # MSVD-QA's youtube_mapping.txt (empty: beside the questions file)
VIDEO_DIR = "/data/msvd/YouTubeClips"  # the clips
FRAMES = 8                        # frames per clip, sampled uniformly (T)
POSITION_WORDS = False            # add a word naming where a frame's shape lies (from its local tokens; the demo's)
EVAL_KS: tuple[int, ...] = (1, 2)  # VoCo tokens per frame to evaluate (each <= the trained k_max; the paper's video: 2)
CONDITIONS_RUN: tuple[str, ...] = ("upper", "none", "lower", "voco", "last", "shuffled")  # conditions to run
ANSWER_SET = "open"               # open (free generation), all (the file's answers) or category (the answers of the question's category)
MAX_QUESTIONS = 0                 # evaluate a seeded sample of this many questions (0: all)
VIDEO_TEXT = "Video:"             # the prompt text before the frames
QUESTION_TEXT = "\nQuestion: {question}\nAnswer:"  # the prompt text after the frames
MAX_NEW_TOKENS = 10               # longest answer
BATCH_SIZE = 8                    # questions decoded together
COMPRESS_CHUNK = 32               # distinct frames compressed together
SEED = 0                          # question sample and shuffled orders
DEVICE = "auto"                   # auto, cpu or cuda
OUT_DIR = "out/eval_video"        # where results are written

settings = configure(globals())
STAGE = EVAL_VIDEO
IS_MAIN = True


def check_settings(info: dict) -> None:
    bad = [c for c in CONDITIONS_RUN if c not in CONDITIONS]
    if bad or not CONDITIONS_RUN:
        raise V2LError(f"--conditions_run {list(CONDITIONS_RUN)}: use some of {', '.join(CONDITIONS)}")
    if not EVAL_KS or any(not 1 <= k <= info["k_max"] for k in EVAL_KS):
        raise V2LError(f"--eval_ks {list(EVAL_KS)}: {VOCO_DIR} was trained with at most k_max="
                       f"{info['k_max']} VoCo tokens; use k between 1 and {info['k_max']}")
    if FRAMES < 1:
        raise V2LError(f"--frames {FRAMES}: use 1 or more")


def decode(voco, prompter, rows: list, label: str, constraints, device) -> tuple[list[str], float]:
    """(answers of the realised prompts ``rows``, decoding seconds)."""
    eos = prompter.text_tokenizer.eos_token_id
    answers, seconds = [], 0.0
    for s in tqdm(range(0, len(rows), BATCH_SIZE), desc=label, leave=False, disable=not IS_MAIN):
        cons = constraints[s:s + BATCH_SIZE] if constraints is not None else None
        t0 = synced_clock(device)
        gen = greedy(voco, rows[s:s + BATCH_SIZE], MAX_NEW_TOKENS, cons, eos)
        seconds += synced_clock(device) - t0
        answers += [prompter.text_tokenizer.decode(g, skip_special_tokens=True) for g in gen]
    return answers, seconds


def main():
    global IS_MAIN
    ddp = dist.init(DEVICE, OUT_DIR)
    IS_MAIN, device = ddp.is_main, ddp.device
    llm = load_llm(LLM, dtype=llm_dtype(LLM_DTYPE, device), device=device)
    set_attention(llm, ATTN)
    voco, info, trained = load_video_voco(VOCO_DIR, llm, TOKENIZER_DIR)
    check_settings(info)
    questions, missing = load_questions(DATASET, QUESTIONS_FILE, VIDEO_DIR, ANSWERS_FILE or None,
                                        MAPPING_FILE or None)
    if missing and ddp.is_main:
        print(f"{len(missing)} questions name a clip not in {VIDEO_DIR} (first: question "
              f"{missing[0]}): skipped")
    if not questions:
        raise V2LError(f"{QUESTIONS_FILE}: no question has its clip in {VIDEO_DIR}; check --video_dir")
    if MAX_QUESTIONS and MAX_QUESTIONS < len(questions):
        questions = sorted(random.Random(SEED).sample(questions, MAX_QUESTIONS), key=lambda q: q.qid)
    videos = sorted({q.video for q in questions})
    mine_v = set(videos[ddp.rank::ddp.world])
    mine = [q for q in questions if q.video in mine_v]
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=device)
    stats = SampleStats()
    words = clip_words(tokenizer, llm.text_tokenizer, sorted(mine_v), FRAMES, info, POSITION_WORDS,
                       stats, progress=ddp.is_main)
    del tokenizer
    prompter = VideoPrompter(llm.text_tokenizer, VIDEO_TEXT, QUESTION_TEXT)
    segments = [prompter.segments(q.question, [frame_key(q.video, t) for t in range(FRAMES)])
                for q in mine]
    cands = candidate_sets(questions, ANSWER_SET)
    constraints = None if cands is None else [
        NameTrie([prompter.encode(" " + a.strip()) for a in cands[q.category if ANSWER_SET == "category" else ""]],
                 llm.text_tokenizer.eos_token_id) for q in mine]
    seeds = [f"{SEED}:{q.qid}" for q in mine]
    positions = {c: [prompt_positions(realize_clip(s, c, words=words)) for s in segments]
                 for c in ("upper", "none")}
    if "upper" in CONDITIONS_RUN and positions["upper"]:
        check_context(llm.model, max(positions["upper"]) + MAX_NEW_TOKENS,
                      "a clip's prompt with every frame's full tokens (upper)",
                      "lower --frames or drop upper from --conditions_run")

    answers, seconds, compress_s, compressed = {}, {}, {}, {}
    for c in ("upper", "none"):
        if c in CONDITIONS_RUN:
            rows = [realize_clip(s, c, words=words) for s in segments]
            answers[c], seconds[c] = decode(voco, prompter, rows, c, constraints, device)
    for phase in ("lower", "voco"):
        runs = [c for c in CONDITIONS_RUN if c == phase or (phase == "voco" and c in ("last", "shuffled"))]
        if not runs:
            continue
        if phase == "voco":
            voco.load_adapter_state(trained)
        for k in EVAL_KS:
            blocks = FrameBlocks(words)
            t0 = synced_clock(device)
            blocks.compress(voco, list(words), k, COMPRESS_CHUNK)
            compress_s[(phase, k)], compressed[(phase, k)] = synced_clock(device) - t0, blocks.compressed
            for c in runs:
                rows = [realize_clip(s, c, blocks=blocks, seed=sd) for s, sd in zip(segments, seeds)]
                answers[(c, k)], seconds[(c, k)] = decode(voco, prompter, rows, f"{c} k={k}",
                                                          constraints, device)
    part = {"qids": [q.qid for q in mine], "answers": answers, "seconds": seconds,
            "compress_s": compress_s, "compressed": compressed, "positions": positions,
            "frame_tokens": {v: sum(len(words[frame_key(v, t)]) for t in range(FRAMES)) for v in mine_v},
            "short": stats.short, "clips": stats.clips}
    if ddp.active:
        dist.barrier(ddp)
    parts = dist.all_gather_objects(part, ddp)
    if ddp.is_main:
        report(parts, questions, llm, missing)
    dist.shutdown(ddp)


def accuracy_row(name: str, k, flags: list[bool], seconds: float | None, cats: list[str]) -> dict:
    n, c = len(flags), sum(flags)
    lo, hi = wilson_interval(c, n)
    per = {}
    for cat in sorted(set(cats)):
        sub = [f for f, x in zip(flags, cats) if x == cat]
        per[cat] = {"n": len(sub), "accuracy": sum(sub) / len(sub),
                    "ci95": list(wilson_interval(sum(sub), len(sub)))}
    return {"condition": name, "k": k, "n": n, "correct": c, "accuracy": c / n, "ci95": [lo, hi],
            "clips_per_s": n / seconds if seconds else None, "by_category": per}


def report(parts: list[dict], questions, llm, missing: list[str]) -> None:
    by_id = {q.qid: q for q in questions}
    qids = [qid for p in parts for qid in p["qids"]]
    order = sorted(range(len(qids)), key=lambda i: qids[i])
    qs = [by_id[qids[i]] for i in order]
    cats = [q.category for q in qs]

    def merged(key) -> list[str]:
        got = [a for p in parts for a in p["answers"][key]]
        return [got[i] for i in order]

    def total(field: str, key) -> float:
        return sum(p[field][key] for p in parts)

    labels = [c for c in ("upper", "none") if c in parts[0]["answers"]]
    labels += sorted((key for key in parts[0]["answers"] if isinstance(key, tuple)),
                     key=lambda x: (x[1], CONDITIONS.index(x[0])))
    rows, flags, predictions = [], {}, {}
    for key in labels:
        preds = merged(key)
        flags[key] = [exact_match(p, q.answer) for p, q in zip(preds, qs)]
        predictions[key if isinstance(key, str) else f"{key[0]} k={key[1]}"] = preds
        name, k = (key, None) if isinstance(key, str) else key
        rows.append(accuracy_row(name, k, flags[key], total("seconds", key), cats))
    for r in rows:
        if r["condition"] == "voco" and "upper" in flags and ("lower", r["k"]) in flags:
            up, lo = rows[labels.index("upper")], rows[labels.index(("lower", r["k"]))]
            gap = up["accuracy"] - lo["accuracy"]
            r["retention"] = (r["accuracy"] - lo["accuracy"]) / gap if gap > 0 else None
            r["retention_ci95"] = retention_interval(flags["upper"], flags[("lower", r["k"])],
                                                     flags[("voco", r["k"])], seed=SEED)
        for control in ("last", "shuffled"):
            if r["condition"] == "voco" and (control, r["k"]) in flags:
                r[f"minus_{control}"] = r["accuracy"] - rows[labels.index((control, r["k"]))]["accuracy"]
    cost = costs(parts, llm, rows)
    short = [s for p in parts for s in p["short"]]
    notes = {"missing_clips": len(missing), "missing_first": missing[:5],
             "short_clips": len(short), "short_first": short[:5],
             "clips": sum(p["clips"] for p in parts), "questions": len(qs)}
    if short:
        print(f"{len(short)} of {notes['clips']} clips have fewer than {FRAMES} frames (first: "
              f"{short[0]}): their frames were repeated in time order")
    write_results(rows, cost, notes, predictions, qs)


def costs(parts: list[dict], llm, rows: list[dict]) -> dict:
    """Per clip: tokens and KV bytes with the full frame tokens and with k VoCo positions per
    frame; clips read per second (decoding); compression per distinct frame."""
    per_token = kv_bytes_per_token(llm.model)
    tokens = [t for p in parts for t in p["frame_tokens"].values()]
    full = sum(tokens) / len(tokens)
    up = next((r for r in rows if r["condition"] == "upper"), None)
    out = {"kv_bytes_per_token": per_token, "frames_per_clip": FRAMES,
           "full": {"tokens_per_clip": full, "kv_bytes_per_clip": full * per_token,
                    "clips_per_s": up["clips_per_s"] if up else None}}
    for key in sorted({k for p in parts for k in p["compress_s"]}):
        phase, k = key
        if phase != "voco":
            continue
        r = next((x for x in rows if x["condition"] == "voco" and x["k"] == k), None)
        made = sum(p["compressed"][key] for p in parts)
        secs = sum(p["compress_s"][key] for p in parts)
        out[f"voco k={k}"] = {
            "tokens_per_clip": FRAMES * k, "kv_bytes_per_clip": FRAMES * k * per_token,
            "kv_reduction": 1 - FRAMES * k / full, "distinct_frames_compressed": made,
            "frames": len(tokens) * FRAMES, "compress_s_per_frame": secs / max(1, made),
            "clips_per_s": r["clips_per_s"] if r else None,
            "speedup": (r["clips_per_s"] / up["clips_per_s"]
                        if r and up and r["clips_per_s"] and up["clips_per_s"] else None)}
    return out


def write_results(rows: list[dict], cost: dict, notes: dict, predictions: dict, qs) -> None:
    out = Path(OUT_DIR)
    summary = []
    for r in rows:
        c = cost.get(f"voco k={r['k']}", {}) if r["condition"] == "voco" else (
            cost["full"] if r["condition"] == "upper" else {})
        summary.append({"condition": r["condition"], "k": r["k"], "n": r["n"],
                        "accuracy": r["accuracy"], "ci95": r["ci95"],
                        "retention": r.get("retention"), "retention_ci95": r.get("retention_ci95"),
                        "tokens_per_clip": c.get("tokens_per_clip"),
                        "kv_bytes_per_clip": c.get("kv_bytes_per_clip"),
                        "kv_reduction": c.get("kv_reduction"), "clips_per_s": r["clips_per_s"]})
    save_json(out / "results.json", {
        "rows": rows, "summary": summary, "cost": cost, "inputs": notes,
        "answers": {"qid": [q.qid for q in qs], "truth": [q.answer for q in qs],
                    "category": [q.category for q in qs], **predictions},
        "judge": "exact match after VQA-style normalisation (the paper's GPT-3.5 judge cannot "
                 "run offline; not comparable to its numbers)"})
    cats = sorted({c for r in rows for c in r["by_category"]})
    cols = ["condition", "k", "n", "accuracy", "ci95", "retention", "retention_ci95",
            "tokens_per_clip", "clips_per_s"] + (cats if len(cats) > 1 else [])

    def fmt(s: dict, r: dict, c: str) -> str:
        if c in cats and c not in s:
            return f"{100 * r['by_category'][c]['accuracy']:.1f}" if c in r["by_category"] else "-"
        v = s[c]
        if v is None:
            return "-"
        if c in ("accuracy", "retention"):
            return f"{100 * v:.1f}"
        if c in ("ci95", "retention_ci95"):
            return f"{100 * v[0]:.1f}-{100 * v[1]:.1f}"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    note = (f"{notes['questions']} questions on {notes['clips']} clips; accuracy % by exact match "
            f"after VQA normalisation (not the paper's GPT judge); {notes['missing_clips']} "
            f"questions skipped (clip missing), {notes['short_clips']} clips with fewer than "
            f"{FRAMES} frames (repeated). KV per clip: full "
            f"{cost['full']['kv_bytes_per_clip'] / 2**10:.1f} KiB; " + ", ".join(
                f"{key} {v['kv_bytes_per_clip'] / 2**10:.1f} KiB (-{100 * v['kv_reduction']:.1f}%)"
                for key, v in cost.items() if key.startswith("voco")))
    files = write_table(out, cols, [[fmt(s, r, c) for c in cols] for s, r in zip(summary, rows)],
                        note=note)
    inputs = finished_inputs(tokenizer=TOKENIZER_DIR)
    if (Path(VOCO_DIR) / MANIFEST).is_file():
        inputs["voco"] = VOCO_DIR
    if (Path(QUESTIONS_FILE).parent / MANIFEST).is_file():
        inputs["questions"] = str(Path(QUESTIONS_FILE).parent)
    write_manifest(out, STAGE, settings, ["results.json", *files], inputs=inputs,
                   info={"summary": summary})


if __name__ == "__main__":
    run_main(main, STAGE, settings)
