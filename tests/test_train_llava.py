"""step7_train_llava_voco.py and engine/llava_train.py on a tiny LLaVA with generated
conversations: the step's loss is the mean over the whole step whatever the micro-batches,
an interrupted and resumed run equals an uninterrupted one, the directory is what
eval_llava.py reads, the trained reader writes its LLM and projector, bad settings refused."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_artifacts import run_script  # noqa: E402
from tiny_llava import make_tiny_llava  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
COLOURS = ("red", "green", "blue")


def run(**flags) -> int:
    return run_script("step7_train_llava_voco.py", **flags)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny LLaVA, 6 images, 9 conversations: single and multi-turn with an image,
    text-only, and one whose image is missing."""
    tmp = tmp_path_factory.mktemp("train_llava")
    paths = make_tiny_llava(tmp / "llava")
    rng = np.random.RandomState(0)
    (tmp / "img").mkdir()
    entries = []
    for i in range(6):
        c = i % 3
        arr = (rng.rand(40, 30 + 4 * i, 3) * 60).astype("uint8")
        arr[..., c] += 190
        Image.fromarray(arr).save(tmp / "img" / f"{i}.png")
        conv = [{"from": "human", "value": "What colour is it?\n<image>"},
                {"from": "gpt", "value": COLOURS[c]}]
        if i % 2:
            conv += [{"from": "human", "value": "Is it bright?"}, {"from": "gpt", "value": "yes"}]
        entries.append({"id": f"e{i}", "image": f"{i}.png", "conversations": conv})
    entries.append({"id": "t0", "conversations": [{"from": "human", "value": "Say hi."},
                                                   {"from": "gpt", "value": "hi"}]})
    entries.append({"id": "t1", "conversations": [{"from": "human", "value": "Count to two."},
                                                   {"from": "gpt", "value": "one two"}]})
    entries.append({"id": "gone", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "x"}]})
    (tmp / "data.json").write_text(json.dumps(entries))
    return {"tmp": tmp, **paths}


def flags(world, out, **extra):
    tmp = world["tmp"]
    return {"llava": world["llava"], "data": tmp / "data.json", "image_folder": tmp / "img",
            "llm_dtype": "fp32", "device": "cpu", "k_max": 2, "train_ks": [1, 2], "lora_rank": 4,
            "epochs": 1, "batch_size": 3, "micro_batch": 2, "max_length": 200, "num_workers": 2,
            "out_dir": tmp / out, **extra}


def weights(out):
    from utils.artifacts import load_tensors
    return load_tensors(Path(out) / "voco.safetensors")


@pytest.fixture(scope="module")
def trained(world):
    assert run(**flags(world, "full")) == 0
    return world["tmp"] / "full"


def test_writes_what_eval_llava_reads(world, trained):
    from engine.llava_eval import load_llava_voco
    from models.llava import load_llava
    from utils.artifacts import load_json, read_manifest
    info = load_json(trained / "voco.json")
    assert info["data"] == {"entries": 8, "with_image": 6, "text_only": 2, "missing_image": 1}
    log = [json.loads(x) for x in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and [r["k"] for r in log] == [1, 2, 1]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert read_manifest(trained)["stage"] == "llava_voco" and (trained / "loss.png").is_file()
    assert not (trained / "checkpoint.pt").exists()
    parts = load_llava(world["llava"], dtype="fp32", device="cpu")
    voco, _, state, layout = load_llava_voco(trained, parts)
    assert layout == "system" and voco.reader == "frozen"      # --layout auto with a frozen reader
    start = voco.adapter_state()        # the untrained start the eval rebuilds
    assert set(state) == set(start)
    moved = [k for k in state if not torch.equal(state[k], start[k].float())]
    assert "voco.embeddings" in moved and any(k.startswith("lora.") for k in moved)


def test_interrupted_and_resumed_equals_uninterrupted(world, trained):
    out = world["tmp"] / "resumed"
    assert run(**flags(world, "resumed", stop_after=1, save_every=1)) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / "voco.safetensors").exists()
    assert run(**flags(world, "resumed", stop_after=1, save_every=1)) == 0
    assert run(**flags(world, "resumed", adapter_lr=5e-4)) == 2     # another run's checkpoint
    assert run(**flags(world, "resumed")) == 0
    # within fp32 rounding, not bitwise: in the system layout two uninterrupted runs in one
    # process already differ in the last bits on CPU, and AdamW carries such differences on
    a, b = weights(trained), weights(out)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    la, lb = ([json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for d in (trained, out))
    assert [(r["step"], r["k"]) for r in la] == [(r["step"], r["k"]) for r in lb]
    assert np.allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)


def test_the_step_is_one_mean_whatever_the_micro_batches(world, trained):
    """micro-batches of 1 and of the whole step, the inputs prepared in this process (0
    workers) and in one worker: the same weights within fp32 rounding."""
    for micro, workers in ((1, 0), (3, 1)):
        assert run(**flags(world, f"micro{micro}", micro_batch=micro, num_workers=workers)) == 0
        a, b = weights(trained), weights(world["tmp"] / f"micro{micro}")
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (micro, k)


def test_loss_counts_are_conversation_losss(world):
    from data.llava import LlavaConversations
    from engine.llava_train import embed, make_voco
    from engine.llava_voco import conversation_loss, loss_counts
    from models.llava import load_llava
    parts = load_llava(world["llava"], dtype="fp32", device="cpu")
    for layout, reader in (("system", "frozen"), ("authors", "adapted")):
        voco = make_voco(parts, layout, reader, 2, 4, 8.0)
        data = LlavaConversations(world["tmp"] / "data.json", parts.tokenizer, world["tmp"] / "img",
                                  layout, 200, parts.image_tokens(), 2)
        samples = [data[i] for i in range(len(data))]
        images = embed(parts, [data.image_path(s) for s in samples], False)
        with torch.no_grad():
            for kl_on in ("text", "answers"):
                _, counts = conversation_loss(voco, samples, images, 1, "both", layout, kl_on)
                got = [loss_counts(s, reader, kl_on) for s in samples]
                assert counts["answer_tokens"] == sum(c[0] for c in got) > 0
                assert counts["kl_positions"] == sum(c[1] for c in got) > 0
        voco.remove()


def test_trained_reader_writes_its_llm_and_projector(world):
    from models.llava import load_llava
    from utils.artifacts import load_json
    out = world["tmp"] / "full_ft"
    assert run(**flags(world, "full_ft", reader="trained", lr=1e-3)) == 0
    assert load_json(out / "voco.json")["trained_reader"] == "trained"
    assert load_json(out / "voco.json")["layout"] == "authors"   # --layout auto: the authors' configuration
    before = load_llava(world["llava"], dtype="fp32", device="cpu")
    after = load_llava(llm=out / "llm", vision=world["vision"], projector=out / "mm_projector.bin",
                       dtype="fp32", device="cpu")
    w0 = before.llm.get_input_embeddings().weight
    w1 = after.llm.get_input_embeddings().weight[:w0.shape[0]]
    assert not torch.equal(w0, w1)
    p0 = dict(before.projector.named_parameters())
    assert any(not torch.equal(p0[n], p) for n, p in after.projector.named_parameters())


def test_modality_grouping_is_llavas():
    """LLaVA's group_by_modality_length: steps of one modality in a shuffled order, the two
    modalities' last steps merged into one at the end; every sample once an epoch."""
    from engine.llava_train import RunOrder, steps_per_epoch
    lengths = [5 + i % 7 for i in range(23)] + [-(3 + i % 5) for i in range(11)]   # 23 images, 11 text
    order = RunOrder(len(lengths), 4, 0, lengths)
    steps = [order.step(s) for s in range(steps_per_epoch(len(lengths), 4))]
    assert sorted(i for step in steps for i in step) == list(range(len(lengths)))
    # 5 + 2 whole steps of one modality, then the 3 + 3 left merged (cut 4 + 2)
    signs = [{x > 0 for x in (lengths[i] for i in step)} for step in steps]
    assert all(len(sign) == 1 for sign in signs[:7]) and signs[:7].count({True}) == 5
    assert {lengths[i] > 0 for i in steps[7] + steps[8]} == {True, False} and len(steps[8]) == 2
    for step in steps[:7]:      # longest first
        assert [abs(lengths[i]) for i in step] == sorted((abs(lengths[i]) for i in step), reverse=True)
    assert order.order(0) != order.order(1)
    assert RunOrder(len(lengths), 4, 0, lengths).order(1) == order.order(1)
    assert RunOrder(len(lengths), 4, 0).order(0) != order.order(0)    # random: no grouping


def test_master_weights_keep_the_steps_that_bf16_rounds_away():
    """A bf16 weight trained through its float32 copy is the float32 trajectory rounded; AdamW
    on the bf16 weight itself (lr 2e-5, LLaMA-sized weights) loses most of the movement."""
    from engine.llava_train import MasterWeights
    bf16 = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(64, 64, generator=g) * 0.02).to(bf16)
    base = torch.randn(64, 64, generator=g)
    grads = [(base + 0.5 * torch.randn(64, 64, generator=g)).to(bf16) for _ in range(50)]
    p, e = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(torch.zeros(3))
    masters = MasterWeights({"w": p, "e": e})
    assert masters.named["e"] is e and masters.named["w"].dtype == torch.float32
    opt = torch.optim.AdamW(list(masters.named.values()), lr=2e-5, weight_decay=0.0)
    ref = torch.nn.Parameter(w0.float())
    ref_opt = torch.optim.AdamW([ref], lr=2e-5, weight_decay=0.0)
    alone = torch.nn.Parameter(w0.clone())
    alone_opt = torch.optim.AdamW([alone], lr=2e-5, weight_decay=0.0)
    for grad in grads:
        p.grad = grad.clone()
        masters.take_grads()
        opt.step()
        masters.to_model()
        opt.zero_grad(set_to_none=True)
        assert p.grad is None
        ref.grad = grad.float()
        ref_opt.step()
        alone.grad = grad.clone()
        alone_opt.step()
    assert p.dtype == bf16 and torch.equal(p.detach(), ref.detach().to(bf16))
    moved = (ref.detach() - w0.float()).abs().mean()
    assert (alone.detach().float() - w0.float()).abs().mean() < 0.5 * moved


def test_an_unreadable_image_is_one_line(world, capsys):
    """a file that is not an image, met in a worker: one line naming it (not a worker's traceback)."""
    tmp = world["tmp"]
    (tmp / "img" / "broken.png").write_text("not an image")
    entries = [{"id": "b", "image": "broken.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "x"}]}]
    (tmp / "broken.json").write_text(json.dumps(entries))
    assert run(**flags(world, "broken", data=tmp / "broken.json", batch_size=1)) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "broken.png: not a readable image" in err[0], err


@pytest.mark.parametrize("extra, message", [
    ({"reader": "trained", "objective": "kl"}, "--objective kl"),
    ({"train_ks": [1, 4]}, "--train_ks"),
    ({"layout": "middle"}, "--layout middle"),
])
def test_bad_settings_one_line(world, capsys, extra, message):
    assert run(**flags(world, "bad", **extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_two_processes_equal_one(world, trained):
    """torchrun, 2 processes (gloo): a step's samples shared out, gradients summed: the weights
    one process makes, within fp32 rounding."""
    import os
    import subprocess
    out = world["tmp"] / "two"
    args = []
    for k, v in flags(world, "two").items():
        args += [f"--{k}", *map(str, v)] if isinstance(v, (list, tuple)) else [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(ROOT / "step7_train_llava_voco.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = weights(trained), weights(out)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("shard", [True, False])
def test_trained_reader_over_two_processes_equals_one(world, shard):
    """reader trained under torchrun (2 processes, gloo), the LLM sharded (FSDP2) or whole in
    each: the fine-tuned LLM, projector and VoCo embeddings equal one process's. The batch of 7
    over 8 entries leaves one sample for a step (one process without any) and steps of text
    only (the projector and the VoCo embeddings without a gradient: not moved, as in one
    process): both are steps 1 and 3 here. Stopped after 2 steps, resumed in one process for
    one, finished in two: the checkpoint holds full tensors whatever the number of processes."""
    import os
    import subprocess
    from safetensors.torch import load_file
    common = {"reader": "trained", "lr": 1e-3, "batch_size": 7, "epochs": 2, "grouping": "random"}
    one, two = world["tmp"] / "ft_one", world["tmp"] / f"ft_two_{shard}"
    if not (one / "voco.json").is_file():
        assert run(**flags(world, "ft_one", **common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    for procs, extra in ((2, {"stop_after": 2}), (1, {"stop_after": 1}), (2, {})):
        args = []
        for k, v in flags(world, two.name, **common, **extra, save_every=1, shard=shard).items():
            args += [f"--{k}", *map(str, v)] if isinstance(v, (list, tuple)) else [f"--{k}", str(v)]
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if procs == 2 else []
        done = subprocess.run([sys.executable, *launch, str(ROOT / "step7_train_llava_voco.py"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        if procs == 2:
            assert ("the LLM sharded over 2 processes" in done.stdout) == shard, done.stdout
    a, b = weights(one), weights(two)
    assert torch.allclose(a["voco.embeddings"], b["voco.embeddings"], rtol=1e-4, atol=1e-6)
    pa, pb = torch.load(one / "mm_projector.bin"), torch.load(two / "mm_projector.bin")
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6), k
    la, lb = load_file(one / "llm" / "model.safetensors"), load_file(two / "llm" / "model.safetensors")
    assert set(la) == set(lb)
    diff = torch.cat([(la[k] - lb[k]).abs().flatten() for k in la])
    # AdamW moves a weight by about lr a step whatever its gradient's size: where a gradient is
    # near fp32 rounding, summing it in another order may change that step by up to a few lr.
    # Everywhere else the two runs agree to fp32 rounding of the weights.
    steps = 4
    assert diff.max() <= 4 * steps * common["lr"]
    assert (diff > 1e-6).float().mean() <= 1e-3, f"{int((diff > 1e-6).sum())} of {diff.numel()} weights differ"


@pytest.mark.slow
def test_bf16_sharded_reader_resumes_exactly(world):
    """reader trained in bf16 under torchrun, sharded: its float32 copies (sharded too) are in
    the checkpoint, so stopped after a step and resumed it ends with the uninterrupted run's
    weights, bit for bit."""
    import os
    import subprocess
    from safetensors.torch import load_file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    common = {"reader": "trained", "lr": 1e-3, "batch_size": 7, "llm_dtype": "bf16", "save_every": 1}
    for name, extra in (("bf16_whole", {}), ("bf16_resumed", {"stop_after": 1}), ("bf16_resumed", {})):
        args = []
        for k, v in flags(world, name, **common, **extra).items():
            args += [f"--{k}", *map(str, v)] if isinstance(v, (list, tuple)) else [f"--{k}", str(v)]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(ROOT / "step7_train_llava_voco.py"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(world["tmp"] / "bf16_whole" / "llm" / "model.safetensors")
    b = load_file(world["tmp"] / "bf16_resumed" / "llm" / "model.safetensors")
    assert a["lm_head.weight"].dtype == torch.bfloat16
    for k in a:
        assert torch.equal(a[k], b[k]), k
