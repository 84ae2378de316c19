#!/usr/bin/env bash
# Sweep models x methods x kept ratios x datasets through the runners, the way users drive them:
#
#     export KEEP_RATIO=0.111 PRUNE_METHOD_PRE_LLM=divprune_pre_llm PRUNE_SEED=0 METHOD_TIME=1 PREFILL_TIME=1
#     python run_qwenvl2_5.py --model Qwen2.5-VL-7B-Instruct --data MME --work-dir outputs/sweep [runner flags]
#
# one cell (model x configuration x dataset) per runner call. Vanilla is a cell like any other.
#
# Usage:
#     scripts/sweep.sh --config scripts/sweep_example.conf [flags] [-- runner flags]
#     scripts/sweep.sh --model "qwen Qwen2.5-VL-7B-Instruct /ckpts/qwen7b" \
#         --methods "vanilla pre:random_pre_llm intra:fastv_intra_llm pre:divprune_pre_llm" \
#         --ratios "0.333 0.222 0.111" --datasets "MME POPE" --seeds "0 1 2" \
#         --work-dir outputs/sweep --dry-run -- --judge exact_matching
#
# Flags (each overrides the config file's variable of the same meaning):
#   --config FILE      a bash file setting MODELS, METHODS, RATIOS, DATASETS, SEEDS (arrays), WORK_DIR,
#                      RUNNER_ARGS (array), JOBS, NPROC, ONE_LOAD (0/1); see scripts/sweep_example.conf
#   --model "FAMILY MODEL [MODEL_PATH]"   repeatable. FAMILY: qwen | internvl | llava | llava_next (or the runner's
#                      file name); MODEL: a name the runner knows or a checkpoint folder; MODEL_PATH:
#                      a local checkpoint for that name (passed as --model-path)
#   --methods "..."    method tokens: vanilla | pre:METHOD | intra:METHOD (layer 2, the paper's K) |
#                      intra@K:METHOD | pre:M1+intra[@K]:M2 (two stages: the pre-LLM stage keeps
#                      sqrt(ratio), rounded to 3 decimals, and the intra-LLM stage ratio of the
#                      original tokens, as the paper's 66.7% x 66.7% rows); append ?name=value,...
#                      for hyper-parameters (PRUNE_ARGS), e.g. pre:gprune_pre_llm?iterations=3
#   --ratios "..."     kept ratios (KEEP_RATIO), e.g. "0.333 0.222 0.111"
#   --datasets "..."   VLMEvalKit dataset names
#   --seeds "..."      PRUNE_SEED values; random_* methods run once per seed, the others once (their
#                      model name has no seed, so repeated seeds are the same cell)
#   --work-dir DIR     VLMEvalKit's work dir (default outputs/sweep)
#   --jobs N           run N model names at once (default 1; >1 distorts timings; on GPUs prefer
#                      --shard with one CUDA_VISIBLE_DEVICES per shard)
#   --shard I/N        run only the model names whose index in the plan is I modulo N
#   --nproc N          run each cell under torchrun with N processes (one GPU each: VLMEvalKit shards
#                      the samples by rank, every rank loads its own model copy and writes its own
#                      records and timing lines, rank 0 merges the predictions and scores):
#                      PY -m torch.distributed.run --standalone --nproc-per-node=N RUNNER ...
#   --one-load         run the cells in one process that loads each checkpoint once and switches the
#                      pruning configuration between cells (scripts/sweep_one_load.py); same folders,
#                      names, ledger and records as the default one-runner-per-cell path. Not with
#                      --jobs > 1 or --nproc > 1
#   --python PY        interpreter (default $PYTHON, else python; a relative path, e.g. .venv/bin/python,
#                      is taken from the folder the sweep is started in)
#   --no-timing        do not set METHOD_TIME=1 PREFILL_TIME=1 (vanilla cells then write no records)
#   --dry-run          list the cells with their state (done / partial / todo, or invalid with why) and
#                      commands; run nothing; exit 1 when a cell is invalid
#   -- ARGS...         runner flags for every cell, replacing the config's RUNNER_ARGS (e.g.
#                      -- --judge exact_matching --max-new-tokens 8; a bare -- passes none)
#
# Invalid cells: the plan makes the checks a runner makes before it loads a model (the configuration,
# the checkpoint folder, layers against its depth, the method's family, the dataset name; a hub id
# that is not in the local Hugging Face cache is checked when its cells run). A cell that fails them
# is never started: it is logged as FAIL with the reason, and the sweep exits 1.
#
# Stopping: Ctrl-C (or SIGTERM to the sweep) stops every running cell, torchrun ranks included, and
# the sweep (exit 130); run it again to resume.
#
# Skipping and resuming: a cell is done when VLMEvalKit's score file for <model name>/<dataset>
# exists (the model name is <model>[__<protocol tag>]__<PruneConfig tag or vanilla>, computed by
# `python -m scripts.cell_name` from the cell and the runner flags);
# done cells are skipped. Before an unfinished cell runs, `cell_name resume` carries its saved
# predictions into the prediction root VLMEvalKit will use (VLMEvalKit alone resumes only the same
# day and commit, and only the pickles of the same --nproc; see scripts/_common.py:carry_forward), so
# only the missing samples are recomputed.
# Bookkeeping lands in <work-dir>/_sweep/<model name>/: ledger.tsv (which records of
# prune_records.jsonl belong to which dataset and attempt) and <dataset>/run.log plus the seed's
# timing files (each runner runs in that folder).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

MODELS=()
METHODS=(vanilla)
RATIOS=(0.333 0.222 0.111)
DATASETS=(MME)
SEEDS=(0)
WORK_DIR=outputs/sweep
RUNNER_ARGS=()
JOBS=1
NPROC=1
ONE_LOAD=0
SHARD=""
PY="${PYTHON:-python}"
TIMING=1
DRY=0

die() { echo "sweep.sh: $*" >&2; exit 2; }
log() { echo "[sweep $(date +%H:%M:%S)] $*"; }

# The config file first, so that flags override it wherever they appear.
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ ${args[i]} == -- ]] && break
    if [[ ${args[i]} == --config ]]; then
        (( i + 1 < ${#args[@]} )) || die "--config needs a file"
        [[ -f ${args[i+1]} ]] || die "no config file ${args[i+1]}"
        # shellcheck disable=SC1090
        source "${args[i+1]}"
    fi
done

models_from_flags=()
while (($#)); do
    case $1 in
        --config) shift 2 ;;
        --model) models_from_flags+=("$2"); shift 2 ;;
        --methods) read -r -a METHODS <<< "$2"; shift 2 ;;
        --ratios) read -r -a RATIOS <<< "$2"; shift 2 ;;
        --datasets) read -r -a DATASETS <<< "$2"; shift 2 ;;
        --seeds) read -r -a SEEDS <<< "$2"; shift 2 ;;
        --work-dir) WORK_DIR=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --shard) SHARD=$2; shift 2 ;;
        --nproc) NPROC=$2; shift 2 ;;
        --one-load) ONE_LOAD=1; shift ;;
        --python) PY=$2; shift 2 ;;
        --no-timing) TIMING=0; shift ;;
        --dry-run) DRY=1; shift ;;
        --) shift; RUNNER_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown flag $1 (see --help)" ;;
    esac
done
((${#models_from_flags[@]})) && MODELS=("${models_from_flags[@]}")
((${#MODELS[@]})) || die "no model: pass --model \"FAMILY MODEL [MODEL_PATH]\" or set MODELS in --config"
((${#DATASETS[@]})) || die "no dataset"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs takes a positive integer"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc takes a positive integer"
if ((ONE_LOAD)) && ((JOBS > 1 || NPROC > 1)); then die "--one-load runs one process: not with --jobs or --nproc > 1"; fi
if [[ -n $SHARD ]]; then
    [[ $SHARD =~ ^([0-9]+)/([1-9][0-9]*)$ ]] || die "--shard takes I/N, e.g. 0/2"
    SHARD_I=${BASH_REMATCH[1]} SHARD_N=${BASH_REMATCH[2]}
    ((SHARD_I < SHARD_N)) || die "--shard I/N needs I < N"
fi

# Each cell runs in its own folder (cd), so a relative interpreter (PYTHON=.venv/bin/python) is made
# absolute here, without resolving symlinks (a venv's python must stay the venv's).
if [[ $PY == */* ]]; then
    [[ -d $(dirname "$PY") ]] || die "no python $PY (--python / PYTHON): its folder does not exist"
    PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi
[[ -x $PY ]] || command -v "$PY" > /dev/null || die "no python $PY (--python / PYTHON)"

WORK="$(realpath -m "$WORK_DIR")"
((DRY)) || mkdir -p "$WORK"
if [[ -n ${LMUData:-} && -d $LMUData ]]; then export LMUData="$(cd "$LMUData" && pwd)"; fi
if [[ -n ${MMEVAL_ROOT:-} ]]; then
    log "note: MMEVAL_ROOT is unset for the runners (it would override --work-dir $WORK)"
fi

helper() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m scripts.cell_name "$@"; }

runner_of() {
    case $1 in
        qwen|qwen2_5_vl|qwenvl|run_qwenvl2_5.py) echo run_qwenvl2_5.py ;;
        internvl|internvl3|run_internvl3.py) echo run_internvl3.py ;;
        llava|llava_v1.5|run_llava.py) echo run_llava.py ;;
        llava_next|llava-next|llava_v1.6|run_llava_next.py) echo run_llava_next.py ;;
        *) die "unknown family '$1' (qwen, internvl, llava or llava_next)" ;;
    esac
}

# The pruning variables of one method token at one ratio and seed, as "KEY=VALUE ..." (no spaces inside).
method_env() {
    local token=$1 r=$2 seed=$3 hp="" pre="" intra="" by_var=0 part rest layer
    local -a parts
    [[ $token == vanilla ]] && return 0
    if [[ $token == *\?* ]]; then hp=${token#*\?}; token=${token%%\?*}; fi
    IFS='+' read -r -a parts <<< "$token"
    for part in "${parts[@]}"; do
        case $part in
            pre:?*) [[ -z $pre ]] || die "two pre-LLM methods in '$1'"; pre=${part#pre:} ;;
            intra:?*) [[ -z $intra ]] || die "two intra-LLM methods in '$1'"; intra="2:${part#intra:}"; by_var=1 ;;
            intra@*:?*)
                [[ -z $intra ]] || die "two intra-LLM methods in '$1'"
                rest=${part#intra@}; layer=${rest%%:*}
                [[ $layer =~ ^[0-9]+$ ]] || die "bad layer in '$part' (intra@LAYER:METHOD)"
                intra="$layer:${rest#*:}" ;;
            *) die "bad method token '$1': use vanilla, pre:METHOD, intra:METHOD, intra@K:METHOD or pre:M1+intra@K:M2" ;;
        esac
    done
    local env
    if [[ -n $pre && -n $intra ]]; then
        env="KEEP_RATIO=$(awk -v r="$r" 'BEGIN { printf "%.3f", sqrt(r) }') PRUNE_METHOD_PRE_LLM=$pre INTRA_LLM_LAYER_SPECS=$intra:$r"
    elif [[ -n $pre ]]; then
        env="KEEP_RATIO=$r PRUNE_METHOD_PRE_LLM=$pre"
    elif ((by_var)); then  # the README's way: PRUNE_METHOD_INTRA_LLM prunes at layer 2
        env="KEEP_RATIO=$r PRUNE_METHOD_INTRA_LLM=${intra#2:}"
    else
        env="KEEP_RATIO=$r INTRA_LLM_LAYER_SPECS=$intra"
    fi
    [[ -n $hp ]] && env+=" PRUNE_ARGS=$hp"
    echo "$env PRUNE_SEED=$seed"
}

abs_if_dir() { if [[ -d $1 ]]; then (cd "$1" && pwd); else echo "$1"; fi; }

# ---------------------------------------------------------------------------- the cells
cells=""
for entry in "${MODELS[@]}"; do
    read -r fam model mpath extra <<< "$entry"
    [[ -n ${model:-} && -z ${extra:-} ]] || die "bad model entry '$entry': \"FAMILY MODEL [MODEL_PATH]\""
    runner=$(runner_of "$fam")
    model=$(abs_if_dir "$model")
    mpath=$( [[ -n ${mpath:-} ]] && abs_if_dir "$mpath" || echo - )
    for method in "${METHODS[@]}"; do
        if [[ $method == vanilla ]]; then ratios=(1); seeds=(-); else ratios=("${RATIOS[@]}"); seeds=("${SEEDS[@]}"); fi
        for r in "${ratios[@]}"; do
            for seed in "${seeds[@]}"; do
                env=$(method_env "$method" "$r" "$seed")
                for data in "${DATASETS[@]}"; do
                    cells+="$runner"$'\t'"$model"$'\t'"$mpath"$'\t'"$data"$'\t'"$env"$'\n'
                done
            done
        done
    done
done
plan=$(printf '%s' "$cells" | helper plan --work-dir "$WORK" -- ${RUNNER_ARGS[@]+"${RUNNER_ARGS[@]}"}) || die "the plan failed (see the message above)"

# Group the plan's lines by model name (in plan order); a group runs its datasets one after another.
declare -a group_names=() group_lines=()
declare -A group_of=()
while IFS= read -r line; do
    [[ -z $line ]] && continue
    IFS=$'\t' read -r _ name _ <<< "$line"
    if [[ -z ${group_of[$name]+x} ]]; then
        group_of[$name]=${#group_names[@]}
        group_names+=("$name")
        group_lines+=("")
    fi
    group_lines[${group_of[$name]}]+="$line"$'\n'
done <<< "$plan"

selected=()
for g in "${!group_names[@]}"; do
    if [[ -z $SHARD ]] || ((g % SHARD_N == SHARD_I)); then selected+=("$g"); fi
done

# Cells the runner would refuse before loading (the plan's status "invalid: <why>": configuration,
# checkpoint folder, depth, family, dataset name) are never started: run_lines holds the others.
invalid=() run_lines=()
for g in "${selected[@]}"; do
    run_lines[g]=""
    while IFS= read -r line; do
        [[ -z $line ]] && continue
        if [[ $line == invalid:* ]]; then invalid+=("$line"); else run_lines[g]+="$line"$'\n'; fi
    done <<< "${group_lines[$g]}"
done

command_of() {  # runner model path data -> the runner command, one word per line
    local runner=$1 model=$2 path=$3 data=$4
    printf '%s\n' "$PY"
    ((NPROC > 1)) && printf '%s\n' -m torch.distributed.run --standalone "--nproc-per-node=$NPROC"
    printf '%s\n' "$ROOT/$runner" --model "$model"
    [[ $path != - ]] && printf '%s\n' --model-path "$path"
    printf '%s\n' --data "$data" --work-dir "$WORK"
    ((${#RUNNER_ARGS[@]})) && printf '%s\n' "${RUNNER_ARGS[@]}"
    return 0
}

if ((DRY)); then
    n=0 ndone=0
    for g in "${selected[@]}"; do
        while IFS=$'\t' read -r status name runner model path data env; do
            [[ -z $name ]] && continue
            mapfile -t cmd < <(command_of "$runner" "$model" "$path" "$data")
            timing=$([[ $TIMING == 1 ]] && echo " METHOD_TIME=1 PREFILL_TIME=1")
            if [[ $status == invalid:* ]]; then  # why first: the command would stop with this message
                printf 'invalid %s  %s  |  %s  |  export%s%s; %s\n' "$name" "$data" "${status#invalid: }" "${env:+ $env}" "$timing" "${cmd[*]}"
                continue
            fi
            printf '%-7s %s  %s  |  export%s%s; %s\n' "$status" "$name" "$data" "${env:+ $env}" "$timing" "${cmd[*]}"
            n=$((n + 1)); [[ $status == done ]] && ndone=$((ndone + 1))
        done <<< "${group_lines[$g]}"
    done
    log "dry run: $((n + ${#invalid[@]})) cells ($ndone done, $((n - ndone)) to run, ${#invalid[@]} invalid), work dir $WORK$( ((ONE_LOAD)) && echo '; --one-load: one process, each checkpoint loaded once')"
    exit $((${#invalid[@]} > 0))
fi

nlines() { if [[ -f $1 ]]; then wc -l < "$1" | tr -d ' '; else echo 0; fi; }

clear_pruning_env() {
    local v
    for v in $(compgen -e); do
        case $v in KEEP_*|PRUNE_*|INTRA_LLM*|PRE_LLM*|METHOD_TIME|PREFILL_TIME|MMEVAL_ROOT) unset "$v" ;; esac
    done
}

run_cell() {  # one plan line's fields; returns 1 when the cell has no score file afterwards
    local status=$1 name=$2 runner=$3 model=$4 path=$5 data=$6 env=$7
    if [[ $status != done ]]; then status=$(helper status --work-dir "$WORK" --name "$name" --data "$data"); fi
    if [[ $status == done ]]; then log "skip  $name  $data (done)"; return 0; fi
    local book="$WORK/_sweep/$name" records="$WORK/$name/prune_records.jsonl"
    mkdir -p "$book/$data"
    local resume saved what rc=0
    resume=$(helper resume --work-dir "$WORK" --name "$name" --data "$data" --nproc "$NPROC")
    saved=${resume%%$'\t'*} what=${resume#*$'\t'}
    local -a cmd
    mapfile -t cmd < <(command_of "$runner" "$model" "$path" "$data")
    log "run   $name  $data ($status; $what)"
    printf 'start\t%s\t%s\t%s\t%s\t%s\n' "$data" "$(nlines "$records")" "$saved" "$(date +%s.%N)" \
        "export ${env:+$env }$([[ $TIMING == 1 ]] && echo 'METHOD_TIME=1 PREFILL_TIME=1'); ${cmd[*]}" >> "$book/ledger.tsv"
    (
        cd "$book/$data"
        clear_pruning_env
        for kv in $env; do export "${kv?}"; done
        if [[ $TIMING == 1 ]]; then export METHOD_TIME=1 PREFILL_TIME=1; fi
        exec "${cmd[@]}"
    ) >> "$book/$data/run.log" 2>&1 || rc=$?
    printf 'end\t%s\t%s\t%s\t%s\n' "$data" "$(nlines "$records")" "$rc" "$(date +%s.%N)" >> "$book/ledger.tsv"
    status=$(helper status --work-dir "$WORK" --name "$name" --data "$data")
    if [[ $status != done ]]; then
        log "FAIL  $name  $data (exit $rc, no score file; log: $book/$data/run.log)"
        return 1
    fi
    log "done  $name  $data"
}

run_group() {  # the cells of one model name, in order, under a lock (two sweeps never share a name)
    local g=$1 failed=0
    local name=${group_names[$g]}
    mkdir -p "$WORK/_sweep/$name"
    if command -v flock > /dev/null; then
        exec {lock}> "$WORK/_sweep/$name/lock"
        flock -n "$lock" || { log "skip  $name (another sweep holds $WORK/_sweep/$name/lock)"; return 0; }
    fi
    while IFS=$'\t' read -r status name runner model path data env; do
        [[ -z $name ]] && continue
        run_cell "$status" "$name" "$runner" "$model" "$path" "$data" "$env" || failed=$((failed + 1))
    done <<< "${run_lines[g]}"
    return $((failed > 0))
}

# Ctrl-C (SIGINT to the whole foreground process group) or a SIGTERM to the sweep stops the whole
# sweep, not one cell: every group of cells runs as a background job (whose processes ignore SIGINT,
# as background jobs of a script do), so this shell's trap runs at once; it sends SIGTERM to every
# process of the running jobs (collected first: torchrun's ranks included, and a group cannot
# start its next cell in between) and exits 130. The killed cell has a start line and no end line
# in its ledger, as a killed sweep always had: the next run resumes it.
process_tree() { local pid=$1 child; echo "$pid"; for child in $(pgrep -P "$pid" 2> /dev/null); do process_tree "$child"; done; }
on_signal() {
    trap '' INT TERM
    local pids=() job
    for job in $(jobs -p); do mapfile -t -O "${#pids[@]}" pids < <(process_tree "$job"); done
    log "interrupted by SIG$1: stopping the sweep (${#pids[@]} running processes)"
    ((${#pids[@]} == 0)) || kill -TERM "${pids[@]}" 2> /dev/null || true  # some may have exited already
    wait
    log "sweep interrupted in $WORK: run it again to resume"
    exit 130
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

failed=0 running=0
for line in ${invalid[@]+"${invalid[@]}"}; do
    IFS=$'\t' read -r status name _ _ _ data _ <<< "$line"
    log "FAIL  $name  $data (not run: ${status#invalid: })"
    failed=1
done
if ((ONE_LOAD)); then
    selected_lines=""
    for g in "${selected[@]}"; do selected_lines+=${run_lines[g]}; done
    timing_flag=$([[ $TIMING == 1 ]] || echo --no-timing)
    {
        printf '%s' "$selected_lines" | (
            clear_pruning_env
            PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m scripts.sweep_one_load --work-dir "$WORK" \
                ${timing_flag:+"$timing_flag"} -- ${RUNNER_ARGS[@]+"${RUNNER_ARGS[@]}"}
        )
    } &
    wait $! || failed=1
    selected=()
fi
for g in "${selected[@]}"; do
    [[ -n ${run_lines[g]} ]] || continue  # every cell of this name was invalid
    (run_group "$g") &
    if ((JOBS == 1)); then
        wait $! || failed=1
    else
        running=$((running + 1))
        if ((running >= JOBS)); then wait -n || failed=1; running=$((running - 1)); fi
    fi
done
while ((running > 0)); do wait -n || failed=1; running=$((running - 1)); done
log "sweep finished in $WORK$( ((failed)) && echo ' with failed cells (see FAIL lines)')"
exit $failed
