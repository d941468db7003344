#!/usr/bin/env bash
# Kaldi-style option parsing, sourced by recipes after their defaults:
#   stage=0; dir=exp/x; . tools/parse_options.sh
# turns `--stage 3 --dir exp/y --decode_modes "a b"` (or --name=value) into
# shell variables. Only variables that already exist may be set (a typo is an
# error naming the option); `--help` prints the current values.
# What remains after the options is left in "$@".

while true; do
  [ -z "${1:-}" ] && break
  case "$1" in
    --help|-h)
      echo "Usage: $0 [--option value]..."
      echo "Options (current values):"
      grep -oE '^[a-z_][a-z0-9_]*=' "$0" 2>/dev/null | tr -d '=' | sort -u | while read -r __v; do
        printf '  --%s %s\n' "$__v" "$(eval echo "\"\${$__v}\"")"
      done
      exit 0 ;;
    --*=*)
      __name="${1%%=*}"; __name="${__name#--}"; __value="${1#*=}"; shift ;;
    --*)
      __name="${1#--}"
      if [ $# -lt 2 ]; then echo "$0: error: option --$__name needs a value" >&2; exit 1; fi
      __value="$2"; shift 2 ;;
    *) break ;;
  esac
  __name="${__name//-/_}"
  if ! [[ "$__name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "$0: error: invalid option name --$__name" >&2; exit 1
  fi
  if [ -z "${!__name+set}" ]; then
    echo "$0: error: unknown option --$__name" >&2; exit 1
  fi
  printf -v "$__name" '%s' "$__value"
done
unset __name __value __v
true
