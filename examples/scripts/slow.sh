#!/bin/sh
set -eu
i=1
while [ "$i" -le "$STEPS" ]; do
  echo "step $i/$STEPS"
  sleep "$STEP_DELAY"
  i=$((i + 1))
done
echo "done"
