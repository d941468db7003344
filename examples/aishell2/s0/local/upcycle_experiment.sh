#!/usr/bin/env bash
# Sparse-upcycling evidence on the `make demo` corpus, same total budget (6 epochs):
#   (a) dense 3 epochs (its own 3-epoch schedule), `wenet-moe upcycle` of its averaged
#       model (4 experts, top-2, topk router, no noise), MoE 3 epochs (3-epoch schedule)
#   (b) MoE from scratch 6 epochs: the demo's own run (conf/train_demo_moe.yaml)
#   (c) dense 6 epochs (conf/train_demo_dense.yaml)
# Training and decoding go through run.sh stages 4/5 with demo.sh's flags; then every
# epoch checkpoint and the averaged model are decoded on dev and the table printed.
#   local/upcycle_experiment.sh DEMO_DIR WORK_DIR [STEP ...]
# DEMO_DIR: a finished `make demo` work dir (corpus, data, exp/demo_moe); it is only
# read. STEPs (default: all, in order): setup train_c train_a decode table; optional
# train_a2: (a') like (a) but upcycling the dense phase's last epoch checkpoint
# instead of its average (run it before decode/table to get its row); optional
# train_a3: (a'') the usual upcycling practice: upcycle (c)'s checkpoint after N1
# epochs of the 6-epoch dense schedule and continue at the learning rate that schedule
# had reached, without a new warmup, decaying to its final value over the N2 epochs
# (needs train_c). Every step
# skips finished work (run.sh does; decodes whose CER file exists are kept), so
# steps can run concurrently (train_c beside train_a) and a rerun changes nothing.
# Knobs (environment): CPU_PROCS (2), NJ (2), SEED (1), MODES ("ctc_greedy_search
# attention_rescoring"), N_EPOCHS_DENSE (3).
set -euo pipefail
recipe=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
[ $# -ge 2 ] || { sed -n '2,/^set /{/^set /!p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 1; }
demo=$(readlink -f "$1"); work=$2; shift 2
steps=${*:-setup train_c train_a decode table}
cpu_procs=${CPU_PROCS:-2}
nj=${NJ:-2}
seed=${SEED:-1}
modes=${MODES:-ctc_greedy_search attention_rescoring}
n1=${N_EPOCHS_DENSE:-3}
[ -f "$demo/exp/demo_moe/train.yaml" ] && [ -s "$demo/data/train/data.list" ] || {
  echo "upcycle_experiment.sh: $demo is not a finished demo dir (no exp/demo_moe/train.yaml or data/train/data.list)" >&2; exit 1; }

mkdir -p "$work"
work=$(readlink -f "$work")
cd "$work"
for f in run.sh path.sh local conf; do ln -sfn "$recipe/$f" "$f"; done
for f in corpus data; do ln -sfn "$demo/$f" "$f"; done
mkdir -p exp gen_conf
ln -sfn "$demo/exp/demo_moe" exp/b_moe_6ep
. ./path.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$nj}
wenet_moe() { "$PYTHON" -c 'import sys; from wenet_moe.cli import main; sys.exit(main())' "$@"; }
say() { echo "=== [upcycle_experiment $(date -u +%H:%M:%S)] $*"; }
common=(--nj "$nj" --average_num 3 --val_best false --decode_sets dev --decode_chunks -1
        --decode_modes "$modes" --batch_size 32 --num_workers 1 --seed "$seed" --cpu_procs "$cpu_procs")
total=$("$PYTHON" local/fill_config.py conf/train_demo_moe.yaml --get max_epoch)
steps_total=$("$PYTHON" local/fill_config.py conf/train_demo_moe.yaml --get scheduler_conf.max_steps)
n2=$(( total - n1 ))

for step in $steps; do
  case $step in
  setup)
    # the first phase and the upcycled phase each get their own cosine schedule, as
    # long as its share of the total epochs (the demo's 2460 steps over 6 epochs)
    "$PYTHON" local/fill_config.py conf/train_demo_dense.yaml gen_conf/dense_${n1}ep.yaml \
      max_epoch=$n1 scheduler_conf.max_steps=$(( steps_total * n1 / total ))
    "$PYTHON" local/fill_config.py conf/train_demo_moe.yaml gen_conf/moe_${n2}ep.yaml \
      max_epoch=$n2 scheduler_conf.max_steps=$(( steps_total * n2 / total ))
    say "setup done: $work"
    ;;
  train_c)
    say "(c) dense ${total} epochs"
    bash run.sh --stage 4 --stop_stage 5 "${common[@]}" --train_config conf/train_demo_dense.yaml \
      --dir exp/c_dense_${total}ep
    ;;
  train_a)
    say "(a) dense ${n1} epochs"
    bash run.sh --stage 4 --stop_stage 4 "${common[@]}" --train_config gen_conf/dense_${n1}ep.yaml \
      --dir exp/a_dense_${n1}ep
    [ -f exp/a_dense_${n1}ep/avg_3.pt ] ||
      wenet_moe average --dst_model exp/a_dense_${n1}ep/avg_3.pt --src_path exp/a_dense_${n1}ep --num 3
    up=exp/a_dense_${n1}ep_upcycled
    if [ ! -f $up/final.pt ]; then
      say "(a) upcycling exp/a_dense_${n1}ep/avg_3.pt: 4 experts, top-2, topk, no noise"
      # (upcycle writes through a temporary dir of its own; train.yaml names $up's files)
      wenet_moe upcycle --config exp/a_dense_${n1}ep/train.yaml --checkpoint exp/a_dense_${n1}ep/avg_3.pt \
        --output_dir $up --n_expert 4 --n_expert_activated 2 --router topk --noise 0.0
    fi
    say "(a) upcycled MoE ${n2} epochs"
    bash run.sh --stage 4 --stop_stage 5 "${common[@]}" --train_config gen_conf/moe_${n2}ep.yaml \
      --dir exp/a_upcycled_${n2}ep --upcycle_from $up
    # the dense phase's averaged model (the upcycling start) decoded after the critical path
    bash run.sh --stage 5 --stop_stage 5 "${common[@]}" --train_config gen_conf/dense_${n1}ep.yaml \
      --dir exp/a_dense_${n1}ep
    ;;
  train_a2)
    [ -f exp/a_dense_${n1}ep/$(( n1 - 1 )).pt ] || { echo "upcycle_experiment.sh: train_a2 needs train_a's dense phase (exp/a_dense_${n1}ep/$(( n1 - 1 )).pt)" >&2; exit 1; }
    up=exp/a2_dense_${n1}ep_last_upcycled
    if [ ! -f $up/final.pt ]; then
      say "(a') upcycling exp/a_dense_${n1}ep/$(( n1 - 1 )).pt (the last epoch): 4 experts, top-2, topk, no noise"
      wenet_moe upcycle --config exp/a_dense_${n1}ep/train.yaml --checkpoint exp/a_dense_${n1}ep/$(( n1 - 1 )).pt \
        --output_dir $up --n_expert 4 --n_expert_activated 2 --router topk --noise 0.0
    fi
    say "(a') upcycled MoE ${n2} epochs"
    bash run.sh --stage 4 --stop_stage 5 "${common[@]}" --train_config gen_conf/moe_${n2}ep.yaml \
      --dir exp/a2_upcycled_${n2}ep --upcycle_from $up
    ;;
  train_a3)
    src=exp/c_dense_${total}ep/$(( n1 - 1 )).pt
    [ -f $src ] || { echo "upcycle_experiment.sh: train_a3 needs train_c's checkpoint $src" >&2; exit 1; }
    up=exp/a3_dense_${n1}ep_of_${total}_upcycled
    if [ ! -f $up/final.pt ]; then
      say "(a'') upcycling $src (epoch $n1 of the ${total}-epoch dense run): 4 experts, top-2, topk, no noise"
      wenet_moe upcycle --config exp/c_dense_${total}ep/train.yaml --checkpoint $src \
        --output_dir $up --n_expert 4 --n_expert_activated 2 --router topk --noise 0.0
    fi
    # the dense schedule's learning rate after N1 of its epochs: the MoE phase starts there
    lr=$("$PYTHON" - conf/train_demo_dense.yaml $(( steps_total * n1 / total )) <<'PY'
import sys
from wenet_moe.config import load_yaml
from wenet_moe.train.scheduler import cosine_lr
c = load_yaml(sys.argv[1]); s = c["scheduler_conf"]
print(f"{cosine_lr(int(sys.argv[2]), float(c['optim_conf']['lr']), int(s['warmup_steps']), int(s['max_steps']), float(s['final_lr'])):.6g}")
PY
)
    "$PYTHON" local/fill_config.py conf/train_demo_moe.yaml gen_conf/moe_${n2}ep_continue.yaml \
      max_epoch=$n2 scheduler_conf.max_steps=$(( steps_total * n2 / total )) \
      scheduler_conf.warmup_steps=0 optim_conf.lr=$lr
    say "(a'') upcycled MoE ${n2} epochs from lr $lr, no warmup"
    bash run.sh --stage 4 --stop_stage 5 "${common[@]}" --train_config gen_conf/moe_${n2}ep_continue.yaml \
      --dir exp/a3_upcycled_${n2}ep --upcycle_from $up
    ;;
  decode)
    # every epoch checkpoint on dev at full context; the averaged models are decoded
    # by run.sh stage 5 (decode_dev_full)
    for d in exp/a_dense_${n1}ep exp/a_upcycled_${n2}ep exp/a2_upcycled_${n2}ep exp/a3_upcycled_${n2}ep exp/b_moe_${total}ep \
             exp/c_dense_${total}ep; do
      for ckpt in $(ls $d 2>/dev/null | sed -n 's/^\([0-9][0-9]*\)\.pt$/\1/p' | sort -n); do
        # exp/b is the demo's own directory: its decodes go under $work
        rdir=exp/decode_$(basename $d)/ep$ckpt
        todo=()
        for mode in $modes; do [ -s $rdir/$mode/wer ] || todo+=($mode); done
        [ ${#todo[@]} -gt 0 ] || continue
        say "decoding dev with $d/$ckpt.pt: ${todo[*]}"
        wenet_moe recognize --config $d/train.yaml --checkpoint $d/$ckpt.pt --data_type raw \
          --test_data data/dev/data.list --result_dir $rdir --modes "${todo[@]}" --beam_size 10 \
          --batch_size 32 --decoding_chunk_size -1 --ctc_weight 0.5 --reverse_weight 0.5 --device cpu
        for mode in "${todo[@]}"; do
          "$PYTHON" "$WENET_MOE_ROOT/tools/compute_cer.py" --char=1 --v=1 data/dev/text $rdir/$mode/text \
            > $rdir/$mode/wer.tmp && mv $rdir/$mode/wer.tmp $rdir/$mode/wer
        done
      done
    done
    ;;
  table)
    "$PYTHON" local/upcycle_table.py --exp exp --n1 $n1 --n2 $n2 --modes $modes | tee RESULTS_upcycle.md
    ;;
  *) echo "upcycle_experiment.sh: unknown step '$step' (setup train_c train_a train_a2 train_a3 decode table)" >&2; exit 1 ;;
  esac
done
