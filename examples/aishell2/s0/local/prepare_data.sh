#!/usr/bin/env bash
# Usage: local/prepare_data.sh CORPUS_DIR DATA_DIR
# CORPUS_DIR: an AISHELL-2 list directory (wav.scp + trans.txt, wav paths relative
# to it), e.g. AISHELL-2/iOS/data or AISHELL-DEV-TEST-SET/iOS/dev.
# Writes DATA_DIR/{wav.scp,text,utt2spk}; reports what it skipped and why.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "Usage: $0 CORPUS_DIR DATA_DIR" >&2
  exit 1
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/prepare_data.py" "$1" "$2"
