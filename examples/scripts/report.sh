#!/bin/sh
set -eu
echo "building report for $ENVIRONMENT"
printf '{"environment": "%s", "task": "%s", "attempt": %s}\n' \
  "$ENVIRONMENT" "$AQSH_TASK_ID" "$AQSH_RETRY" > "$AQSH_RESULT_FILE"
echo "report written"
