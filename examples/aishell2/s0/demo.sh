#!/usr/bin/env bash
# `make demo`: synthesize a ~3 h Mandarin corpus, run the recipe's stages 0-7
# with a small U2++ MoE config (dev also decoded with w8a8 experts), print the CER
# table and transcribe one wav
# through the torch-free runtime; then stages 8-9: CER on dev and test without
# and with a character n-gram LM (TLG) and with hotwords drawn from test phrases
# absent from the training text (tools/make_hotwords.py). Work happens in $DEMO_WORK (default: demo/ at
# the repository root); a rerun reuses every finished step.
# Knobs (environment): DEMO_HOURS (3), DEMO_VOCAB (100 characters), DEMO_SEED (1:
# corpus and training), DEMO_TRAIN_SEED (training only; default DEMO_SEED, the exp
# dir gets a _seedN suffix when it differs), DEMO_NJ (2), DEMO_CPU_PROCS (2 gloo DDP
# training processes), DEMO_CONFIG, DEMO_DEV_UTTS / DEMO_TEST_UTTS (200),
# DEMO_AVERAGE_NUM (3), DEMO_LM_ORDER (3), DEMO_HOTWORDS (100), DEMO_HOTWORD_LEN (4),
# DEMO_LM_ACOUSTIC_SCALE (2.0), DEMO_LM_LENGTH_PENALTY (2.0), DEMO_WORK.
set -euo pipefail
recipe=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
root=$(cd "$recipe/../../.." && pwd)
work=${DEMO_WORK:-$root/demo}
hours=${DEMO_HOURS:-3}
vocab=${DEMO_VOCAB:-100}
seed=${DEMO_SEED:-1}
train_seed=${DEMO_TRAIN_SEED:-$seed}
cpu_procs=${DEMO_CPU_PROCS:-2}
nj=${DEMO_NJ:-2}
config=${DEMO_CONFIG:-conf/train_demo_moe.yaml}
dev_utts=${DEMO_DEV_UTTS:-200}
test_utts=${DEMO_TEST_UTTS:-200}
average_num=${DEMO_AVERAGE_NUM:-3}
lm_order=${DEMO_LM_ORDER:-3}
hotwords=${DEMO_HOTWORDS:-100}          # phrases drawn from data/test/text
hotword_len=${DEMO_HOTWORD_LEN:-4}      # characters per phrase
# LM weight against CTC, tuned on dev (ctc_wfst, grid acoustic_scale 1-3 x
# length_penalty 0-4): the graph score is 2 * (CTC + 2 per unit) + LM
lm_acoustic_scale=${DEMO_LM_ACOUSTIC_SCALE:-2.0}
lm_length_penalty=${DEMO_LM_LENGTH_PENALTY:-2.0}
exp=exp/demo_moe
[ "$train_seed" = "$seed" ] || exp=exp/demo_moe_seed$train_seed
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$nj}

mkdir -p "$work"
for f in run.sh path.sh local conf; do ln -sfn "$recipe/$f" "$work/$f"; done
cd "$work"
. ./path.sh
start=$(date +%s)
say() { echo "=== [demo $(( $(date +%s) - start ))s] $*"; }

say "synthesizing ${hours} h of Mandarin speech (espeak-ng) into $work/corpus"
"$PYTHON" "$root/tools/synth_corpus.py" corpus --hours "$hours" --dev_utts "$dev_utts" --test_utts "$test_utts" \
  --vocab_size "$vocab" --noise_prob 0.3 --reverb_prob 0.2 --seed "$seed" --nj "$nj"

say "recipe stages 0-7 ($config)"
bash run.sh --stage 0 --stop_stage 7 --nj "$nj" \
  --trn_set corpus/iOS/data --dev_set corpus/iOS/dev --tst_set corpus/iOS/test \
  --train_config "$config" --dir $exp --average_num "$average_num" --val_best false \
  --decode_sets dev --runtime_set test --batch_size 32 --num_workers 1 --seed "$train_seed" \
  --cpu_procs "$cpu_procs"

say "dev decoded again with w8a8 experts (int8 weights and rows; VNNI dot products where the CPU has them)"
bash run.sh --stage 5 --stop_stage 5 --dir $exp --average_num "$average_num" --val_best false \
  --decode_sets dev --decode_expert_precision w8a8 --batch_size 32 --num_workers 1 > /dev/null

say "results"
"$PYTHON" local/cer_table.py $exp | tee $exp/RESULTS.md

wav=$(head -1 data/test/wav.scp | cut -d' ' -f2-)
key=$(head -1 data/test/wav.scp | cut -d' ' -f1)
say "transcribing $wav with the torch-free runtime (ONNX, chunk 16, attention rescoring)"
echo "$key $wav" > $exp/one_wav.scp
"$PYTHON" -m wenet_moe_runtime.decode --model_dir $exp/export/onnx --wav_scp $exp/one_wav.scp \
  --result $exp/one_wav.txt --chunk_size 16
echo "reference:  $(grep "^$key " data/test/text | cut -d' ' -f2-)"
echo "recognized: $(cut -d' ' -f2- $exp/one_wav.txt)"

say "LM and hotwords (stages 8-9): character ${lm_order}-gram LM + TLG graph from the training text; \
${hotwords} hotwords of ${hotword_len} characters from test sentences, absent from the training text"
"$PYTHON" "$root/tools/make_hotwords.py" --test data/test/text --train data/train/text --has_key \
  --num "$hotwords" --length "$hotword_len" --out data/hotwords.txt
# the no-LM baseline on test (stage 5 decoded dev only)
bash run.sh --stage 5 --stop_stage 5 --dir $exp --average_num "$average_num" --val_best false \
  --decode_sets test --decode_chunks -1 --decode_modes "ctc_prefix_beam_search attention_rescoring" \
  --batch_size 32 --num_workers 1 > /dev/null
bash run.sh --stage 8 --stop_stage 9 --dir $exp --average_num "$average_num" --val_best false \
  --lm_order "$lm_order" --decode_sets "dev test" --decode_chunks -1 --batch_size 32 --num_workers 1 \
  --acoustic_scale "$lm_acoustic_scale" --length_penalty "$lm_length_penalty" --context_path data/hotwords.txt
"$PYTHON" local/cer_table.py $exp --lm full | tee -a $exp/RESULTS.md
say "done in $(( $(date +%s) - start )) s; everything is under $work"
