#!/bin/bash
#SBATCH --job-name=gpt2 --nodes=1 --gpus-per-node=8 --time=04:00:00
#
# A training run in SLURM jobs that resubmit themselves until it is done:
#
#     sbatch slurm_job.sh                   # GPT-2 124M on 8 GPUs, config/gpt2_124m_8gpu.toml
#     CONFIG=config/gpt2_350m.toml OUT_DIR=out-gpt2-350m sbatch slurm_job.sh --auto_batch True
#
# The first job starts the run, every later one resumes it. Each stops itself before the job's time
# limit (--max_time, 6 minutes short of it for start-up and the last checkpoint) with a checkpoint
# and exit status 75, and then queues the next job. torchrun reports any failure of its processes
# as status 1, a stop on the budget among them, so the trainer's own status is read from
# $OUT_DIR/exit_status, which rank 0 writes as the run ends: only a 75 there queues another job.
# Settings come from the environment (sbatch passes it on to the next job too); the words after the
# script's name are flags for train_gpt2.py, passed on to the next job as well.

config=${CONFIG:-config/gpt2_124m_8gpu.toml}
out_dir=${OUT_DIR:-out-gpt2-124m-8gpu}
nproc=${NPROC:-8}
max_time=${MAX_TIME:-03:54:00}

init=scratch
if ls "$out_dir"/iter-*.pt >/dev/null 2>&1; then
    init=resume
fi
rm -f "$out_dir/exit_status"  # an earlier job's: a launch that fails before writing its own must not pass for it
torchrun --standalone --nproc_per_node "$nproc" train_gpt2.py --config "$config" --out_dir "$out_dir" \
    --init_from "$init" --max_time "$max_time" "$@"
status=$?
if [ "$(cat "$out_dir/exit_status" 2>/dev/null)" = 75 ]; then
    sbatch "$0" "$@"  # out of time, not done: queue the next part
    exit 75
fi
exit $status
