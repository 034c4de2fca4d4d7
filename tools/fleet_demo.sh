#!/bin/bash
# The fleet loop on loopback: `jaxvla serve` plus three `jaxvla actor` robots on pick_place/novel at the
# workcell's 10 Hz; only robot-0 has the operator. Usage: tools/fleet_demo.sh PRIOR_RUN DATA_DIR [EPISODES]
set -e
PRIOR=${1:-runs/default}; DATA=${2:-data}; EPISODES=${3:-120}; ROOT=runs/fleet
mkdir -p $ROOT
jaxvla serve default --target.prior "$PRIOR" --target.split novel --fleet.root $ROOT \
  --fleet.offline-data "$DATA/pick_place_train" > $ROOT/serve.out 2>&1 &
SERVE=$!
sleep 60  # the learner publishes the prior's params first
for i in 0 1 2; do
  op=""; [ $i = 0 ] && op="--operator"
  jaxvla actor --robot-id robot-$i --token-file $ROOT/tokens.json --episodes "$EPISODES" --hz 10 \
    --seed $((i * 100000)) $op --folder $ROOT/actor$i --log $ROOT/actor$i.jsonl > $ROOT/actor$i.out 2>&1 &
  PIDS="$PIDS $!"
done
wait $PIDS
sleep 120  # let the learner finish its round
kill $SERVE
wait $SERVE || true
cat $ROOT/actor*.out
