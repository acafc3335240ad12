#!/bin/sh
echo "about to fail with exit code $EXIT_CODE" >&2
exit "$EXIT_CODE"
