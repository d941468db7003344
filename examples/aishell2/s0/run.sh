#!/usr/bin/env bash
# U2++ MoE on AISHELL-2: data preparation, CMVN, dictionary, data lists,
# training, averaging + decoding + CER, export, runtime decoding; optional stages 8-9:
# n-gram LM + TLG graph from the training transcripts, decoding with the graph
# (and with hotwords when --context_path is given): bash run.sh --stage 8 --stop_stage 9
#   bash run.sh [--stage N] [--stop_stage M] [--var value ...]
# Every stage skips work whose outputs already exist, so a rerun changes nothing.
. ./path.sh || exit 1
set -euo pipefail

stage=0
stop_stage=7
nj=2                     # parallel jobs (CMVN, shards, loaders)

# AISHELL-2 directories holding wav.scp + trans.txt (wav paths relative to them)
trn_set=/data/AISHELL-2/iOS/data
dev_set=/data/AISHELL-DEV-TEST-SET/iOS/dev
tst_set=/data/AISHELL-DEV-TEST-SET/iOS/test

train_config=conf/train_u2++_moe.yaml
dir=exp/u2pp_moe
data_type=raw            # raw | shard
num_utts_per_shard=1000
num_workers=2
prefetch=4
cpu_procs=1              # no GPU: training processes (gloo DDP when > 1), nj/cpu_procs threads each
checkpoint=              # initialise training from these weights (optional)
upcycle_from=            # `wenet-moe upcycle` output dir: stage 4 trains its MoE model from
                         # its weights (model blocks, units and CMVN from its train.yaml;
                         # training settings from $train_config)
tensorboard_dir=tensorboard
seed=

# two-phase training (U2++ MoE paper): full context first, then dynamic chunk
two_phase=false
phase1_epochs=           # default: half of max_epoch
phase1_average_num=3

# multi-node torchrun (GPU); CPU falls back to one process
num_nodes=1
HOST_NODE_ADDR="localhost:0"
job_id=2026

average_checkpoint=true
average_num=10
val_best=true
decode_modes="ctc_greedy_search ctc_prefix_beam_search attention attention_rescoring"
decode_chunks="-1 16"    # -1: full context; > 0: chunk size (encoder frames)
decode_sets="dev test"
beam_size=10
batch_size=16
ctc_weight=0.5
reverse_weight=0.5
decode_threads=0
decode_expert_precision= # fp32 | bf16 | bf16a | int8 | w8a8: MoE experts of stage 5's CPU decode (default: moe_conf);
                         # results go to decode_<set>@<precision>_<tag>

export_chunk_size=16     # streaming ONNX export
export_left_chunks=-1
export_expert_precision=  # int8: MoE experts of the fp32 ONNX graphs as 8-bit weights (default: moe_conf)
runtime_mode=attention_rescoring
runtime_set=test
runtime_chunk_size=16
runtime_batch_size=1     # > 1: decode that many files at a time (their chunks in one batched
                         # encoder call: fp32 exports with encoder_batch.onnx)

# stages 8-9: LM (needs `pip install 'wenet-moe[lm]'`, in requirements.txt)
lm_order=3               # character n-gram order (interpolated modified Kneser-Ney)
lang_dir=data/lang_char_${lm_order}gram   # lm.arpa, TLG.fst, words.txt
wfst_modes="ctc_wfst ctc_wfst_rescoring"
wfst_beam=15.0
lattice_beam=7.5
max_active=7000
acoustic_scale=1.0
blank_skip_thresh=0.98
length_penalty=0.0
context_path=            # hotwords, one phrase per line: stage 9 also decodes with them
context_score=3.0

. "$WENET_MOE_ROOT/tools/parse_options.sh"

log() { echo "$(date '+%H:%M:%S') [run.sh stage $1] ${*:2}" >&2; }
# (through cli.main so that its exit status reaches set -e)
wenet_moe() { "$PYTHON" -c 'import sys; from wenet_moe.cli import main; sys.exit(main())' "$@"; }
max_epoch_of() { "$PYTHON" local/fill_config.py "$1" --get max_epoch; }
conf_value() { "$PYTHON" local/fill_config.py "$1" --get "$2"; }
# the highest N of $1/N.pt, or nothing
last_epoch_ckpt() { ls "$1" 2>/dev/null | sed -n 's/^\([0-9][0-9]*\)\.pt$/\1/p' | sort -n | tail -1; }
avg_model=$dir/avg_${average_num}.pt
[ "$average_checkpoint" = true ] || avg_model=$dir/final.pt
declare -A sets=([train]=$trn_set [dev]=$dev_set [test]=$tst_set)

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
  for x in train dev test; do
    if [ -s data/$x/wav.scp ] && [ -s data/$x/text ]; then
      log 0 "data/$x is prepared, skipping"; continue
    fi
    log 0 "preparing data/$x from ${sets[$x]}"
    local/prepare_data.sh "${sets[$x]}" data/$x
  done
fi

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
  if [ -s data/train/global_cmvn ]; then
    log 1 "data/train/global_cmvn exists, skipping"
  else
    log 1 "global CMVN statistics over data/train/wav.scp"
    "$PYTHON" "$WENET_MOE_ROOT/tools/compute_cmvn_stats.py" --num_workers $nj \
      --train_config $train_config --in_scp data/train/wav.scp --out_cmvn data/train/global_cmvn
  fi
fi

dict=data/dict/units.txt
if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
  if [ -s $dict ]; then
    log 2 "$dict exists, skipping"
  else
    log 2 "dictionary $dict from data/train/text"
    mkdir -p data/dict
    {
      echo "<blank> 0"; echo "<unk> 1"; echo "<sos/eos> 2"
      "$PYTHON" "$WENET_MOE_ROOT/tools/text2token.py" -s 1 -n 1 --space "▁" data/train/text \
        | cut -f 2- -d" " | tr " " "\n" | grep -v -e '^\s*$' | sort -u | awk '{print $0 " " NR+2}'
    } > $dict.tmp
    mv $dict.tmp $dict
    log 2 "$(($(wc -l < $dict))) units"
  fi
fi

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
  for x in dev test train; do
    if [ -s data/$x/data.list ] && [ -f data/$x/data.list.$data_type ]; then
      log 3 "data/$x/data.list ($data_type) exists, skipping"; continue
    fi
    rm -f data/$x/data.list.raw data/$x/data.list.shard
    if [ "$data_type" = shard ]; then
      log 3 "shards of data/$x"
      "$PYTHON" "$WENET_MOE_ROOT/tools/make_shard_list.py" --num_utts_per_shard $num_utts_per_shard \
        --num_threads $nj data/$x/wav.scp data/$x/text "$(pwd)/data/$x/shards" data/$x/data.list
    else
      log 3 "raw data.list of data/$x"
      "$PYTHON" "$WENET_MOE_ROOT/tools/make_raw_list.py" data/$x/wav.scp data/$x/text data/$x/data.list
    fi
    touch data/$x/data.list.$data_type
  done
fi

# GPUs to use: the ids in CUDA_VISIBLE_DEVICES ("" or -1: none); unset: all torch sees.
count_gpus() {
  if [ -z "${CUDA_VISIBLE_DEVICES+set}" ]; then
    "$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
  elif [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = -1 ]; then
    echo 0
  else
    echo "$CUDA_VISIBLE_DEVICES" | awk -F, '{print NF}'
  fi
}

# train_one CONFIG MODEL_DIR [INIT_CHECKPOINT]: train (or resume) to max_epoch.
train_one() {
  local config=$1 mdir=$2 init=${3:-} max_epoch last resume
  max_epoch=$(max_epoch_of "$config")
  if [ -f "$mdir/$((max_epoch - 1)).pt" ]; then
    log 4 "$mdir holds all $max_epoch epochs, skipping"; return 0
  fi
  last=$(last_epoch_ckpt "$mdir")
  resume=$init
  [ -n "$last" ] && resume=$mdir/$last.pt && log 4 "resuming $mdir from epoch checkpoint $resume"
  mkdir -p "$mdir"
  local args=(--config "$config" --data_type $data_type --train_data data/train/data.list
              --cv_data data/dev/data.list --model_dir "$mdir" --num_workers $num_workers
              --prefetch $prefetch --tensorboard_dir "$tensorboard_dir/$(basename "$mdir")" --no_progress)
  [ -n "$resume" ] && args+=(--checkpoint "$resume")
  [ -n "$seed" ] && args+=(--seed "$seed")
  local num_gpus
  num_gpus=$(count_gpus)
  if [ "$num_gpus" -gt 0 ]; then
    log 4 "training on $num_gpus GPU(s) x $num_nodes node(s): $mdir"
    "$PYTHON" -m torch.distributed.run --nnodes=$num_nodes --nproc_per_node=$num_gpus \
      --rdzv_id=$job_id --rdzv_backend=c10d --rdzv_endpoint=$HOST_NODE_ADDR \
      -m wenet_moe train --device cuda "${args[@]}" --pin_memory
  elif [ "$cpu_procs" -gt 1 ]; then
    local threads=$(( nj / cpu_procs > 0 ? nj / cpu_procs : 1 ))
    log 4 "no GPU: training in $cpu_procs CPU processes (gloo DDP, $threads thread(s) each): $mdir"
    OMP_NUM_THREADS=$threads "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=$cpu_procs \
      -m wenet_moe train --device cpu --dist_backend gloo "${args[@]}"
  else
    log 4 "no GPU: training in one CPU process: $mdir"
    wenet_moe train --device cpu "${args[@]}"
  fi
}

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ]; then
  mkdir -p $dir
  cp -p $dict data/train/global_cmvn $dir/ 2>/dev/null || true
  paths=(tokenizer_conf.symbol_table_path=$(pwd)/$dict cmvn_conf.cmvn_file=$(pwd)/data/train/global_cmvn)
  if [ -n "$upcycle_from" ]; then
    # the upcycled model brings its own vocabulary, CMVN and features
    [ -f "$upcycle_from/train.yaml" ] && [ -f "$upcycle_from/final.pt" ] || {
      echo "run.sh: --upcycle_from $upcycle_from: no train.yaml + final.pt (run wenet-moe upcycle)" >&2; exit 1; }
    up=$(cd "$upcycle_from" && pwd)
    paths=(--model_from $up/train.yaml tokenizer_conf.symbol_table_path=$up/units.txt)
    [ -f $up/global_cmvn ] && paths+=(cmvn_conf.cmvn_file=$up/global_cmvn)
    [ -n "$checkpoint" ] || checkpoint=$up/final.pt
    log 4 "starting from the upcycled model $up (weights $checkpoint)"
  fi
  if [ "$two_phase" = true ]; then
    max_epoch=$(max_epoch_of $train_config)
    p1=${phase1_epochs:-$(( (max_epoch + 1) / 2 ))}
    local/fill_config.py $train_config $dir/phase1/input.yaml "${paths[@]}" \
      encoder_conf.use_dynamic_chunk=false max_epoch=$p1
    train_one $dir/phase1/input.yaml $dir/phase1 "$checkpoint"
    p1_avg=$dir/phase1/avg_${phase1_average_num}.pt
    if [ ! -f $p1_avg ]; then
      wenet_moe average --dst_model $p1_avg --src_path $dir/phase1 --num $phase1_average_num
    fi
    local/fill_config.py $train_config $dir/input.yaml "${paths[@]}" \
      encoder_conf.use_dynamic_chunk=true max_epoch=$(( max_epoch - p1 > 0 ? max_epoch - p1 : 1 ))
    train_one $dir/input.yaml $dir $p1_avg
  else
    local/fill_config.py $train_config $dir/input.yaml "${paths[@]}"
    train_one $dir/input.yaml $dir "$checkpoint"
  fi
fi

if [ ${stage} -le 5 ] && [ ${stop_stage} -ge 5 ]; then
  if [ "$average_checkpoint" = true ]; then
    if [ -f $avg_model ]; then
      log 5 "$avg_model exists, skipping averaging"
    else
      log 5 "averaging $average_num checkpoints into $avg_model"
      best=(); [ "$val_best" = true ] && best=(--val_best)
      wenet_moe average --dst_model $avg_model --src_path $dir --num $average_num "${best[@]}"
    fi
  fi
  decode_device=cpu
  [ "$(count_gpus)" -gt 0 ] && decode_device=cuda
  prec=(); sfx=
  [ -n "$decode_expert_precision" ] && prec=(--expert_precision $decode_expert_precision) && sfx=@$decode_expert_precision
  for x in $decode_sets; do
    for chunk in $decode_chunks; do
      if [ "$chunk" = -1 ]; then tag=full; else tag=chunk$chunk; fi
      rdir=$dir/decode_${x}${sfx}_$tag
      todo=()
      for mode in $decode_modes; do [ -s $rdir/$mode/text ] || todo+=($mode); done
      if [ ${#todo[@]} -gt 0 ]; then
        log 5 "decoding data/$x ($tag): ${todo[*]}"
        wenet_moe recognize --config $dir/train.yaml --checkpoint $avg_model --data_type $data_type \
          --test_data data/$x/data.list --result_dir $rdir --modes "${todo[@]}" --beam_size $beam_size \
          --batch_size $batch_size --decoding_chunk_size $chunk --ctc_weight $ctc_weight \
          --reverse_weight $reverse_weight --threads $decode_threads --device $decode_device "${prec[@]}"
      else
        log 5 "data/$x ($tag) is decoded, skipping"
      fi
      for mode in $decode_modes; do
        if [ ! -s $rdir/$mode/wer ] || [ $rdir/$mode/text -nt $rdir/$mode/wer ]; then
          "$PYTHON" "$WENET_MOE_ROOT/tools/compute_cer.py" --char=1 --v=1 data/$x/text $rdir/$mode/text \
            > $rdir/$mode/wer.tmp && mv $rdir/$mode/wer.tmp $rdir/$mode/wer
        fi
      done
    done
  done
  "$PYTHON" local/cer_table.py $dir
fi

if [ ${stage} -le 6 ] && [ ${stop_stage} -ge 6 ]; then
  for fmt in torchscript onnx; do
    out=$dir/export/$fmt
    if [ -f $out/.done ]; then log 6 "$out exists, skipping"; continue; fi
    log 6 "exporting $avg_model as $fmt to $out"
    extra=()
    [ $fmt = onnx ] && extra=(--chunk_size $export_chunk_size --num_decoding_left_chunks $export_left_chunks --quantize int8 --int8_verify_data data/dev/wav.scp)
    [ $fmt = onnx ] && [ -n "$export_expert_precision" ] && extra+=(--expert_precision $export_expert_precision)
    rm -rf $out.tmp
    wenet_moe export --config $dir/train.yaml --checkpoint $avg_model --output_dir $out.tmp --format $fmt "${extra[@]}"
    cp -p $dict $out.tmp/units.txt 2>/dev/null || true
    touch $out.tmp/.done
    rm -rf $out && mv $out.tmp $out
  done
fi

if [ ${stage} -le 7 ] && [ ${stop_stage} -ge 7 ]; then
  for variant in fp32 int8; do
    rdir=$dir/runtime_${runtime_set}_chunk${runtime_chunk_size}_$variant
    if [ ! -s $rdir/text ]; then
      log 7 "decoding data/$runtime_set with the torch-free runtime ($variant, chunk $runtime_chunk_size)"
      q=(); [ $variant = int8 ] && q=(--int8)
      "$PYTHON" -m wenet_moe_runtime.decode --model_dir $dir/export/onnx --wav_scp data/$runtime_set/wav.scp \
        --result $rdir/text --mode $runtime_mode --chunk_size $runtime_chunk_size --beam_size $beam_size \
        --ctc_weight $ctc_weight --reverse_weight $reverse_weight --batch_size $runtime_batch_size "${q[@]}"
    else
      log 7 "$rdir/text exists, skipping"
    fi
    if [ ! -s $rdir/wer ] || [ $rdir/text -nt $rdir/wer ]; then
      "$PYTHON" "$WENET_MOE_ROOT/tools/compute_cer.py" --char=1 --v=1 data/$runtime_set/text $rdir/text \
        > $rdir/wer.tmp && mv $rdir/wer.tmp $rdir/wer
    fi
    log 7 "runtime $variant: $(grep Overall $rdir/wer)"
  done
fi

if [ ${stage} -le 8 ] && [ ${stop_stage} -ge 8 ]; then
  if [ -s $lang_dir/TLG.fst ] && [ -s $lang_dir/words.txt ]; then
    log 8 "$lang_dir/TLG.fst exists, skipping"
  else
    mkdir -p $lang_dir
    if [ ! -s $lang_dir/lm.arpa ]; then
      log 8 "training a character ${lm_order}-gram LM on data/train/text"
      "$PYTHON" "$WENET_MOE_ROOT/tools/train_ngram_lm.py" --text data/train/text --has_key --char \
        --order $lm_order --arpa $lang_dir/lm.arpa
    fi
    log 8 "compiling $lang_dir/TLG.fst"
    "$PYTHON" "$WENET_MOE_ROOT/tools/make_tlg.py" --units $dict --arpa $lang_dir/lm.arpa --graph_dir $lang_dir
  fi
fi

if [ ${stage} -le 9 ] && [ ${stop_stage} -ge 9 ]; then
  wfst_opts=(--graph_dir $lang_dir --beam $wfst_beam --lattice_beam $lattice_beam --max_active $max_active
             --acoustic_scale $acoustic_scale --blank_skip_thresh $blank_skip_thresh
             --length_penalty $length_penalty)
  decode_device=cpu
  [ "$(count_gpus)" -gt 0 ] && decode_device=cuda
  runs=("lm:$wfst_modes")
  [ -n "$context_path" ] && runs+=("hotwords:ctc_prefix_beam_search attention_rescoring"
                                   "lm_hotwords:$wfst_modes")
  for x in $decode_sets; do
    for chunk in $decode_chunks; do
      if [ "$chunk" = -1 ]; then tag=full; else tag=chunk$chunk; fi
      for run in "${runs[@]}"; do
        kind=${run%%:*}; modes=${run#*:}
        rdir=$dir/decode_${x}_${tag}_$kind
        extra=("${wfst_opts[@]}")
        hot=(--context_path "$context_path" --context_score $context_score)
        [ $kind = hotwords ] && extra=("${hot[@]}")
        [ $kind = lm_hotwords ] && extra=("${wfst_opts[@]}" "${hot[@]}")
        todo=()
        for mode in $modes; do [ -s $rdir/$mode/text ] || todo+=($mode); done
        if [ ${#todo[@]} -gt 0 ]; then
          log 9 "decoding data/$x ($tag, $kind): ${todo[*]}"
          wenet_moe recognize --config $dir/train.yaml --checkpoint $avg_model --data_type $data_type \
            --test_data data/$x/data.list --result_dir $rdir --modes "${todo[@]}" --beam_size $beam_size \
            --batch_size $batch_size --decoding_chunk_size $chunk --ctc_weight $ctc_weight \
            --reverse_weight $reverse_weight --threads $decode_threads --device $decode_device "${extra[@]}"
        else
          log 9 "data/$x ($tag, $kind) is decoded, skipping"
        fi
        for mode in $modes; do
          if [ ! -s $rdir/$mode/wer ] || [ $rdir/$mode/text -nt $rdir/$mode/wer ]; then
            "$PYTHON" "$WENET_MOE_ROOT/tools/compute_cer.py" --char=1 --v=1 data/$x/text $rdir/$mode/text \
              > $rdir/$mode/wer.tmp && mv $rdir/$mode/wer.tmp $rdir/$mode/wer
          fi
          log 9 "$x $tag $kind $mode: $(grep Overall $rdir/$mode/wer)"
        done
      done
    done
  done
fi
