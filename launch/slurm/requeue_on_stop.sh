# One task per GPU, started by srun: rank, local rank, world size and master address come from
# Slurm's environment (training/distributed.py), no ssh/pdsh inside the allocation. After a stop
# every rank exits 75 within moments of the others; --wait ends the step if a rank dies alone
# (not --kill-on-bad-exit: it would kill the slower ranks' clean exit 75 and lose the code).
# The warning signal (--signal=USR1@N: the tasks only; with preempt_send_user_signal also when a
# preemption starts its GraceTime) lets the ranks commit a checkpoint and exit 75. A job kill
# (preemption, scontrol requeue, the time limit) sends SIGTERM to every process and SIGKILL
# KillWait seconds later: the ranks commit if one step plus a save fit in KillWait. A SIGTERM from
# `scancel --full` also reaches srun, which answers it by SIGKILLing the tasks at once. Either way
# this shell requeues the job and the rerun resumes from the latest committed checkpoint.
stop_signal=""
trap 'stop_signal=SIGTERM' TERM
trap 'stop_signal=SIGUSR1' USR1
srun --wait=120 ${command}
rc=$$?
if [ "$$rc" -eq ${preempted} ] || [ -n "$$stop_signal" ]; then
    echo "== $$(date -Is) $${stop_signal:-exit code ${preempted}} (srun exit $$rc): requeueing job $$SLURM_JOB_ID, it resumes from the latest committed checkpoint"
    scontrol requeue "$$SLURM_JOB_ID"
fi
exit $$rc
