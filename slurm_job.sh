#!/bin/bash
#SBATCH --job-name=gpt2 --nodes=1 --gpus-per-node=8 --time=04:00:00
#
# A training run in SLURM jobs that resubmit themselves until it is done:
#
#     sbatch slurm_job.sh                   # GPT-2 124M on 8 GPUs, config/gpt2_124m_8gpu.toml
#     CONFIG=config/gpt2_350m.toml OUT_DIR=out-gpt2-350m sbatch slurm_job.sh --auto_batch True
#
# The first job starts the run, every later one resumes it (a checkpoint of the trainer's own names
# in $OUT_DIR, not any iter-*.pt, tells them apart). Each stops itself before the job's time limit
# (--max_time, 6 minutes short of it for start-up and the last checkpoint) with a checkpoint and exit
# status 75, and then queues the next job; a job stopped by SIGTERM (the time limit of a job whose
# --time is shorter than MAX_TIME, or a preemption) saves a checkpoint, exits 143 and queues the
# next job too. torchrun reports any failure of its processes as status 1, these stops among them,
# so the trainer's own status is read from $OUT_DIR/exit_status, which rank 0 writes as the run ends:
# only a 75 or a 143 there queues another job. To end the chain, cancel the queued job as well, or
# stop the running one with Ctrl-C's signal (scancel --signal=INT --full JOBID: status 130).
# Settings come from the environment (sbatch passes it on to the next job too); the words after the
# script's name are flags for train_gpt2.py, passed on to the next job as well.

config=${CONFIG:-config/gpt2_124m_8gpu.toml}
out_dir=${OUT_DIR:-out-gpt2-124m-8gpu}
nproc=${NPROC:-8}
max_time=${MAX_TIME:-03:54:00}

# SLURM signals every process of the job at its time limit, this shell too: it waits for the
# trainer to save its checkpoint and exit, then queues the next job
trap 'echo "slurm_job.sh: SIGTERM: waiting for the trainer to save a checkpoint" >&2' TERM

init=scratch
# the checkpoints are the files checkpoint.py names so (a user's iter-1-notes.pt is none)
if python -c 'import sys, checkpoint; sys.exit(not checkpoint.run_checkpoints(sys.argv[1]))' "$out_dir"; then
    init=resume
fi
rm -f "$out_dir/exit_status"  # an earlier job's: a launch that fails before writing its own must not pass for it
torchrun --standalone --nproc_per_node "$nproc" train_gpt2.py --config "$config" --out_dir "$out_dir" \
    --init_from "$init" --max_time "$max_time" "$@"
status=$?
trainer_status=$(cat "$out_dir/exit_status" 2>/dev/null)
if [ "$trainer_status" = 75 ] || [ "$trainer_status" = 143 ]; then
    sbatch "$0" "$@"  # out of time or stopped by SIGTERM, not done: queue the next part
    exit "$trainer_status"
fi
exit $status
