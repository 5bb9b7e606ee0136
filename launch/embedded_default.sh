#!/usr/bin/env bash
# The embedded default run (README): on CPU, in a few minutes, nothing downloaded.
#   1. train a tiny decoder-only Gemma 2 on the embedded corpus (PrefixLM)
#   2. adapt it to a T5Gemma (encoder and decoder both from it, cross-attention from self-attention)
#   3. train the T5Gemma with UL2, then 4. with PrefixLM + distillation from the Gemma 2
#   5. export the result to a Hugging Face folder, checked against transformers when installed
# Usage: launch/embedded_default.sh [OUTPUT_DIR]   (default runs/embedded; replaced if present)
#   T5G: the t5g command, split into words at spaces (default t5g; e.g. T5G="python -m t5g")
set -euo pipefail
out="${1:-runs/embedded}"
read -r -a t5g <<< "${T5G:-t5g}"
# The embedded default is a CPU job; this also keeps libtpu (the tpu-aot extra), where installed,
# from looking for a TPU at start-up. Set JAX_PLATFORMS to run it elsewhere.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
rm -rf "${out}"
mkdir -p "${out}"
"${t5g[@]}" train --gin_file=experiments/embedded_gemma2_teacher.gin --gin.MODEL_DIR="'${out}/gemma2'"
"${t5g[@]}" adapt --encoder="${out}/gemma2" --decoder="${out}/gemma2" --output="${out}/adapted"
"${t5g[@]}" train --gin_file=experiments/embedded_t5gemma_ul2.gin --gin.MODEL_DIR="'${out}/ul2'" \
  --gin.INIT_CHECKPOINT="'${out}/adapted'"
"${t5g[@]}" train --gin_file=experiments/embedded_t5gemma_prefixlm_kd.gin \
  --gin.MODEL_DIR="'${out}/prefixlm_kd'" --gin.INIT_CHECKPOINT="'${out}/ul2'" \
  --gin.TEACHER_CHECKPOINT="'${out}/gemma2'"
"${t5g[@]}" export --checkpoint="${out}/prefixlm_kd" --output="${out}/hf"
echo "embedded default done: checkpoints under ${out}/, Hugging Face folder ${out}/hf"
