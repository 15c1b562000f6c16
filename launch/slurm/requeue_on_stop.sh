# One task per GPU, started by srun: rank, local rank, world size and master address come from
# Slurm's environment (training/distributed.py), no ssh/pdsh inside the allocation. After a stop
# every rank exits 75 within moments of the others; --wait ends the step if a rank dies alone
# (not --kill-on-bad-exit: it would kill the slower ranks' clean exit 75 and lose the code).
srun --wait=120 ${command}
rc=$$?
if [ "$$rc" -eq ${preempted} ]; then
    # exit code ${preempted}: every rank committed a checkpoint after SIGUSR1/SIGTERM; run again from it
    echo "== $$(date -Is) stopped after a committed checkpoint: requeueing job $$SLURM_JOB_ID"
    scontrol requeue "$$SLURM_JOB_ID"
fi
exit $$rc
