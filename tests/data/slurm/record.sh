#!/bin/bash
# Records real squeue/sacct/scontrol output of the dev cluster for tests/unit/test_slurm_parse.py.
# Run as the cluster user on the dev cluster: bash tests/data/slurm/record.sh  (about 90 s)
set -u
OUT=${OUT:-$(cd "$(dirname "$0")" && pwd)}
SEP=$'\x1f'
SQ_FMT="%i${SEP}%T${SEP}%r${SEP}%S${SEP}%e${SEP}%M${SEP}%j"
SA_FMT=JobIDRaw,State,ExitCode,Start,End,Elapsed,Submit,JobName
W=/tmp/rec; mkdir -p $W; cd $W
sub() { local tag=$1; shift; sbatch --parsable --job-name=hpcc-$tag --comment=hpcc:$tag --no-requeue -o /dev/null -e /dev/null --chdir=$W "$@"; }
T0=$(date +%s)
J_OK=$(sub 00000000-0000-4000-8000-000000000001 --mem=100M -t 1 --wrap 'echo hi')
J_E3=$(sub 00000000-0000-4000-8000-000000000002 --mem=100M -t 1 --wrap 'exit 3')
J_K9=$(sub 00000000-0000-4000-8000-000000000003 --mem=100M -t 1 --wrap 'kill -9 $$')
J_OOM=$(sub 00000000-0000-4000-8000-000000000004 --mem=64M -t 1 --wrap 'python3 -c "b=bytearray(400*1024*1024); import time; time.sleep(2)"')
J_TO=$(sub 00000000-0000-4000-8000-000000000005 --mem=100M -t 1 --wrap 'sleep 300')
J_GPU2=$(sub 00000000-0000-4000-8000-000000000006 --mem=100M -t 2 --gres=gpu:2 --wrap 'sleep 25')
sleep 2
J_PEND=$(sub 00000000-0000-4000-8000-000000000007 --mem=100M -t 1 --gres=gpu:1 --wrap 'true')
J_CAN=$(sub 00000000-0000-4000-8000-000000000008 --mem=100M -t 1 --wrap 'sleep 100')
J_HOLD=$(sub 00000000-0000-4000-8000-000000000009 -H --mem=100M -t 1 --wrap 'true')
J_DL=$(sub 00000000-0000-4000-8000-00000000000a -H --deadline=now+40 --mem=100M -t 1 --wrap 'true')
echo "$J_OK $J_E3 $J_K9 $J_OOM $J_TO $J_GPU2 $J_PEND $J_CAN $J_HOLD $J_DL" > $OUT/job_ids.txt
sleep 4
squeue -h -t all --me -o "$SQ_FMT" > $W/squeue_running.txt
scontrol show job -o > $W/scontrol_running.txt
scancel $J_CAN
sleep 3
squeue -h -t all --me -o "$SQ_FMT" > $W/squeue_mid.txt
scontrol show job -o > $W/scontrol_mid.txt
scancel $J_HOLD
# wait for the timeout job (limit 1 min; Slurm kills some seconds after)
for i in $(seq 1 60); do
  st=$(squeue -h -j $J_TO -o %T 2>/dev/null)
  [ "$st" = TIMEOUT ] && [ "$(squeue -h -j $J_DL -o %T)" != PENDING ] && break
  sleep 3
done
sleep 5
squeue -h -t all --me -o "$SQ_FMT" > $W/squeue_done.txt
scontrol show job -o > $W/scontrol_done.txt
IDS="$J_OK,$J_E3,$J_K9,$J_OOM,$J_TO,$J_GPU2,$J_PEND,$J_CAN,$J_HOLD,$J_DL"
sleep 3
sacct -X -P -n --delimiter="$SEP" --format=$SA_FMT -j $IDS -S now-1hour > $W/sacct_done.txt
# keep only our lines (hpcc-0000...) so colleagues' jobs do not end up in the fixtures
for f in squeue_running squeue_mid squeue_done sacct_done; do grep 'hpcc-00000000-0000-4000-8000' $W/$f.txt > $OUT/$f.txt; done
for f in scontrol_running scontrol_mid scontrol_done; do grep 'JobName=hpcc-00000000-0000-4000-8000' $W/$f.txt > $OUT/$f.txt; done
sacct -n -X -j 1 > $OUT/sacct_probe_on.txt 2>&1
# the deadline job stays PENDING while held (Slurm does not enforce --deadline on held jobs)
scancel $J_DL
echo done $(( $(date +%s) - T0 ))s
