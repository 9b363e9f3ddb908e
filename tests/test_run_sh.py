"""run.sh end to end on tiny random models: all seven stages, interrupted mid-stage and rerun;
the demo's calls recorded, with and without its LLaVA stages.

The first run is killed (SIGTERM to its whole process group) while step 2 is
between chunks; the rerun must skip step 1, resume step 2 from its chunks,
finish every stage, leave every artifact complete (manifest + file sizes) and
print the summary.
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from demo.world import write_world
from tiny_clip import make_tiny_clip
from tiny_llm import make_tiny_llama
from utils.artifacts import is_complete, read_manifest
from utils.stages import CODEBOOK, OPTIONAL, PIPELINE, VOCAB

CORE = [s for s in PIPELINE if s not in OPTIONAL]   # what run.sh runs without COCO, VQA, VOCO=false

REPO = Path(__file__).resolve().parent.parent


def tiny_env(tmp_path: Path) -> dict:
    data = tmp_path / "images"
    write_world(data, seed=0, train_per_class=3, val_per_class=2, size=128,
                colours=("red", "blue"), shapes=("circle", "star"), photos=False)
    llm = Path(make_tiny_llama(tmp_path / "llm", fmt="hf"))
    config = json.loads((llm / "config.json").read_text())   # room for the denoising prompts
    (llm / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    clip = make_tiny_clip(tmp_path / "clip")
    return os.environ | {
        "IMAGENET": str(data), "LLM": str(llm), "CLIP": clip, "OUT": str(tmp_path / "out"),
        "OMP_NUM_THREADS": "1", "PYTHON": "python", "VOCO": "false",
        "STEP1_ARGS": "--batch_size 64 --chunk_size 128",
        "STEP2_ARGS": "--batch_size 16 --chunk_size 48",
        "STEP3_ARGS": "--threshold 0 --num_workers 0 --batch_size 8",
        "STEP4_ARGS": ("--epochs 1 --warmup_epochs 0 --batch_size 4 --max_steps_per_epoch 2 "
                       "--ch 32 --num_res_blocks 1 --z_channels 32 --cross_heads 2 "
                       "--cross_head_dim 16 --global_topk 5 --perceptual_weight 0 "
                       "--disc_weight 0 --num_workers 0 --log_every 1 --n_samples 2"),
        "EVAL_RECONSTRUCTION_ARGS": ("--max_images 4 --batch_size 4 --num_workers 0 "
                                     "--metrics psnr ssim codebook --grid_images 4"),
        "EVAL_UNDERSTANDING_ARGS": ("--n_episodes 4 --global_k 5 --split val --batch_size 4 "
                                    "--num_workers 0"),
        "EVAL_DENOISING_ARGS": ("--max_images 2 --tasks inpainting rotation --metrics psnr ssim "
                                "--num_workers 0 --chunk_images 2 --save_strips 2"),
    }


@pytest.mark.slow
def test_run_sh_interrupted_mid_stage_then_completes(tmp_path):
    env = tiny_env(tmp_path)
    out = Path(env["OUT"])
    first = subprocess.Popen(["bash", "run.sh"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if list(out.glob("codebook/.chunks-*/chunk*.safetensors")):
            break
        time.sleep(0.05)
    assert first.poll() is None, "run.sh ended before step 2 saved its first chunk"
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=30)
    assert is_complete(out / VOCAB.out_dir, VOCAB) and not is_complete(out / CODEBOOK.out_dir, CODEBOOK)

    rerun = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = rerun.stdout
    assert "step 1: expand vocabulary: up to date" in log and "skipped" in log
    for stage in CORE:
        read_manifest(out / stage.out_dir, stage)   # complete: manifest present, files their sizes
    assert (out / "tokenizer" / "tokenizer.pt").is_file()
    assert (out / "eval_reconstruction" / "reconstructions.png").is_file()
    assert list((out / "eval_denoising").glob("*/strips/*.png"))
    summary = log[log.index("== summary"):]
    for heading in ("reconstruction (256 px)", "few-shot understanding", "denoising with the frozen LLM"):
        assert heading in summary
    assert "captioning: not run" in summary                        # no COCO given
    for heading in ("reconstruction", "few-shot understanding", "denoising"):
        assert f"{heading}: not run" not in summary
    results = json.loads((out / "eval_reconstruction" / "results.json").read_text())
    assert results["n_images"] == 4 and results["psnr"] > 0
    numbers = json.loads((out / "summary.json").read_text())
    assert numbers["stage_seconds"]["vocab"] is None                  # skipped in the rerun
    assert all(numbers["stage_seconds"][s.id] >= 0 for s in CORE[1:])
    assert numbers["reconstruction"]["n_images"] == 4
    assert [(r["n_way"], r["k_shot"], r["global_k"]) for r in numbers["understanding"]] == [(2, 1, 5)]
    assert 0 <= numbers["understanding"][0]["accuracy"] <= 1
    assert {r["task"] for r in numbers["denoising"]} == {"inpainting", "rotation"}
    assert all({"variant", "psnr", "ssim", "token_acc"} <= set(r) for r in numbers["denoising"])

    again = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"== {s.title}: up to date in" in again.stdout for s in CORE), again.stdout

    # a changed step-4 setting: steps 1-3 stay; step 4 stops with one line, because its
    # checkpoint belongs to the run of the old settings; without it, step 4 and every
    # evaluation downstream of the rebuilt tokenizer rerun, and the summary is the new one's
    old_tokenizer = read_manifest(out / "tokenizer")["id"]
    changed = env | {"STEP4_ARGS": env["STEP4_ARGS"] + " --lr 1e-3"}
    refused = subprocess.run(["bash", "run.sh"], cwd=REPO, env=changed, capture_output=True,
                             text=True, timeout=240)
    assert refused.returncode == 1 and "rerun: settings changed (--lr 0.00045 there, 0.001 now)" \
        in refused.stdout, refused.stdout[-2000:]
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--lr 0.00045 there, 0.001 now" in error[0] \
        and f"delete {out / 'tokenizer' / 'checkpoints' / 'last.pt'}" in error[0], refused.stderr[-2000:]
    (out / "tokenizer" / "checkpoints" / "last.pt").unlink()
    rebuilt = subprocess.run(["bash", "run.sh"], cwd=REPO, env=changed, capture_output=True,
                             text=True, timeout=240)
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    for stage in CORE[:3]:
        assert f"== {stage.title}: up to date in" in rebuilt.stdout
    for stage in CORE[3:]:
        assert f"== {stage.title} -> " in rebuilt.stdout, stage
    new_tokenizer = read_manifest(out / "tokenizer")["id"]
    assert new_tokenizer != old_tokenizer
    for stage in CORE[4:]:
        assert read_manifest(out / stage.out_dir)["inputs"]["tokenizer"]["id"] == new_tokenizer
    numbers = json.loads((out / "summary.json").read_text())
    assert numbers["stage_seconds"]["tokenizer"] is not None and numbers["reconstruction"] is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(env: dict, outs: tuple[Path, Path], timeout: float) -> list[subprocess.CompletedProcess]:
    """run.sh as 2 nodes x 1 process on this machine: NODE_RANK 0 and 1, started together."""
    layout = {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(_free_port())}
    nodes = [subprocess.Popen(["bash", "run.sh"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=env | layout | {"NODE_RANK": str(rank), "OUT": str(out)})
             for rank, out in enumerate(outs)]
    done = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    return done


@pytest.mark.slow
def test_run_sh_on_two_nodes_over_one_shared_out_makes_the_one_process_artifacts(tmp_path):
    env = tiny_env(tmp_path)
    out = Path(env["OUT"])
    nodes = _two_nodes(env, (out, out), timeout=600)
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}:\n" + node.stdout[-3000:] + node.stderr[-3000:]
    for stage in CORE:
        read_manifest(out / stage.out_dir, stage)
    assert "== summary" in nodes[0].stdout and "node 0 prints the summary" in nodes[1].stdout

    # steps 1-3 in one process, with run.sh's arguments: the same artifacts (content hashes)
    one = tmp_path / "one"
    clip = ["--clip", env["CLIP"], "--clip_allow_unsafe", "false"]
    steps = [
        ["step1_expand_vocabulary.py", "--llm", env["LLM"], "--out_dir", str(one / "vocab"),
         *env["STEP1_ARGS"].split()],
        ["step2_codebook_embedding.py", "--vocab_dir", str(one / "vocab"),
         "--out_dir", str(one / "codebook"), *clip, *env["STEP2_ARGS"].split()],
        ["step3_codebook_filtering.py", "--data_dir", env["IMAGENET"], "--vocab_dir",
         str(one / "vocab"), "--codebook_dir", str(one / "codebook"), "--out_dir", str(one / "global"),
         *clip, *env["STEP3_ARGS"].split()]]
    for stage, cmd in zip(CORE[:3], steps):
        r = subprocess.run(["python", *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert read_manifest(one / stage.out_dir)["id"] == read_manifest(out / stage.out_dir)["id"], stage


def test_run_sh_on_two_nodes_with_an_out_each_stops_with_one_line(tmp_path):
    env = tiny_env(tmp_path)
    outs = (tmp_path / "out0", tmp_path / "out1")
    t0 = time.time()
    nodes = _two_nodes(env, outs, timeout=120)
    assert time.time() - t0 < 60
    for rank, node in enumerate(nodes):
        assert node.returncode != 0, f"node {rank}: {node.stdout[-2000:]}"
        errors = [line for line in node.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "does not see the file rank 0" in errors[0] \
            and "one output folder shared by all of them" in errors[0], node.stderr[-3000:]
    assert not [p for out in outs for p in out.rglob("manifest.json")]
    assert not [p for out in outs for p in out.rglob(".shared-output-check-*")]


@pytest.mark.slow
def test_run_sh_llava_alone_trains_and_evaluates_then_skips(tmp_path):
    """LLAVA set, IMAGENET/LLM/CLIP not: step 7 on the conversations, then eval_llava on a question
    file; a rerun with the same settings skips both, a changed step-7 setting reruns both."""
    import numpy as np
    from PIL import Image
    from tiny_llava import make_tiny_llava
    from utils.stages import EVAL_LLAVA, LLAVA_VOCO
    llava = make_tiny_llava(tmp_path / "llava")["llava"]
    (tmp_path / "img").mkdir()
    rng = np.random.RandomState(0)
    colours = ("red", "green", "blue")
    entries, questions = [], []
    for i in range(4):
        arr = (rng.rand(36, 30, 3) * 60).astype("uint8")
        arr[..., i % 3] += 190
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        entries.append({"id": f"e{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": colours[i % 3]}]})
        questions.append({"question_id": f"q{i}", "image": f"{i}.png", "text": "What colour is it?",
                          "answer": colours[i % 3], "category": "colour"})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    step7 = ("--llm_dtype fp32 --device cpu --k_max 1 --train_ks 1 --lora_rank 2 --epochs 1 "
             "--batch_size 2 --micro_batch 2 --max_length 200 --num_workers 1")
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGENET", "LLM", "CLIP")} | {
        "LLAVA": llava, "LLAVA_DATA": str(tmp_path / "data.json"),
        "LLAVA_IMAGES": str(tmp_path / "img"), "LLAVA_BENCHMARK": "exact",
        "LLAVA_QUESTIONS": str(tmp_path / "questions.jsonl"),
        "LLAVA_BENCH_IMAGES": str(tmp_path / "img"), "OUT": str(tmp_path / "out"),
        "OMP_NUM_THREADS": "1", "PYTHON": "python", "STEP7_ARGS": step7,
        "EVAL_LLAVA_ARGS": "--eval_ks 1 --max_new_tokens 3 --batch_size 2 --device cpu --llm_dtype fp32"}
    out = tmp_path / "out"
    first = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert is_complete(out / LLAVA_VOCO.out_dir, LLAVA_VOCO)
    assert is_complete(out / EVAL_LLAVA.out_dir, EVAL_LLAVA)
    results = json.loads((out / EVAL_LLAVA.out_dir / "results.json").read_text())
    assert "voco" in json.dumps(results) and "upper" in json.dumps(results)
    assert not (out / "vocab").exists()                  # the V2L stages did not run
    rows = json.loads((out / "summary.json").read_text())["llava"]
    assert {(r["condition"], r["k"]) for r in rows} == {("upper", None), ("no_image", None),
                                                        ("lower", 1), ("voco", 1)}
    assert "LLaVA benchmark exact" in first.stdout
    again = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("up to date") == 2, again.stdout[-2000:]
    env["STEP7_ARGS"] = step7 + " --adapter_lr 0.01"
    third = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert third.returncode == 0 and "up to date" not in third.stdout, third.stdout[-2000:]


def _recorded_demo_calls(tmp_path: Path, **settings) -> list[str]:
    """run.sh in demo mode with PYTHON a stand-in that runs run.sh's own helpers (python -m
    utils.*) and records every other command (the stages, demo set-up) as done: the calls the
    demo makes, in order, without running them."""
    calls, stub = tmp_path / "calls.txt", tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\nif [[ "$1" == "-m" && "$2" == utils.* ]]; then exec python "$@"; fi\n'
                    'printf "%s\\n" "$*" >> "$CALLS"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGENET", "LLM", "CLIP", "LLAVA")}
    env |= {"PYTHON": str(stub), "CALLS": str(calls), "OUT": str(tmp_path / "out"), **settings}
    r = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return calls.read_text().splitlines()


def test_run_sh_demo_runs_the_llava_stages_only_when_asked(tmp_path):
    demo = tmp_path / "on" / "out" / "demo"
    (tmp_path / "on").mkdir()
    calls = _recorded_demo_calls(tmp_path / "on", DEMO_LLAVA="true")
    llava = [c for c in calls if "llava" in c]
    assert len(llava) == 3, llava
    assert llava[0].startswith(f"-m demo.llava --out_dir {demo} --parts data,projector")
    model = f"--llm {demo}/llm --vision_tower {demo}/clip --mm_projector {demo}/llava_projector"
    assert llava[1].startswith(f"step7_train_llava_voco.py {model} --data {demo}/llava_data/instruct.json "
                               f"--image_folder {demo}/llava_data ")
    assert llava[2].startswith(f"eval_llava.py {model} --voco_dir ") and "--benchmark exact" in llava[2] \
        and f"--questions {demo}/llava_data/questions.jsonl" in llava[2]
    assert calls.index(llava[0]) > max(i for i, c in enumerate(calls) if c.startswith("eval_compression.py"))
    (tmp_path / "off").mkdir()
    plain = _recorded_demo_calls(tmp_path / "off")
    assert not [c for c in plain if "llava" in c] and len(plain) == len(calls) - 3
