#!/bin/sh
# Inputs arrive as environment variables, never as shell text.
set -eu
i=0
while [ "$i" -lt "$GREET_TIMES" ]; do
  if [ "$GREET_SHOUT" = "true" ]; then
    echo "HELLO, $GREET_NAME!" | tr '[:lower:]' '[:upper:]'
  else
    echo "Hello, $GREET_NAME"
  fi
  i=$((i + 1))
done
