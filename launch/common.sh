# shellcheck shell=bash
# Helpers shared by launch/*.sh: flag parsing, validation and dry-run printing.
# Each script defines usage() before calling parse_flags.

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "${0##*/}: needs bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

DRY_RUN=${DRY_RUN:-0}

# A usage mistake: one line naming it, exit status 2.
usage_error() { echo "${0##*/}: $*" >&2; exit 2; }

# require VAR FLAG: fail unless the variable VAR is set (by FLAG or the environment).
require() { [[ -n ${!1:-} ]] || usage_error "missing $2 (or set $1)"; }

# Quote one word so a shell reads it back unchanged: bare when safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# The words, each quoted, joined by spaces.
quote_all() {
  local word out=()
  for word; do out+=("$(quote "$word")"); done
  printf '%s' "${out[*]}"
}

# Print a command the way it could be pasted, prefixed with "+ ".
show() { printf '+ %s\n' "$(quote_all "$@")"; }

# run CMD...: print CMD (on stderr) and run it; with DRY_RUN=1 only print it (on stdout).
run() {
  if [[ $DRY_RUN == 1 ]]; then show "$@"; return; fi
  show "$@" >&2
  "$@"
}

# parse_flags SPECS ARGS...: set variables from flags. SPECS lists "--flag=VAR" for flags
# taking a value ("--flag V" or "--flag=V") and "--flag:VAR" for switches (VAR=1).
# --dry-run and --help are always understood. --config.* overrides, words that are not
# flags and everything after "--" are collected, in order, in the array REST.
parse_flags() {
  local specs=" $1 " arg flag var
  shift
  REST=()
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --) REST+=("$@"); return ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --config.* | [^-]*) REST+=("$arg"); continue ;;
    esac
    flag=${arg%%=*}
    if [[ $specs == *" $flag="* ]]; then
      var=${specs#*" $flag="}
      if [[ $arg == *=* ]]; then
        printf -v "${var%% *}" '%s' "${arg#*=}"
      elif (($#)) && [[ $1 != --* ]]; then
        printf -v "${var%% *}" '%s' "$1"
        shift
      else
        usage_error "$flag needs a value"
      fi
    elif [[ $specs == *" $arg:"* ]]; then
      var=${specs#*" $arg:"}
      printf -v "${var%% *}" 1
    else
      usage_error "unknown flag $arg (see --help)"
    fi
  done
}

# Fail if parse_flags collected words this command does not take.
no_rest() { ((${#REST[@]} == 0)) || usage_error "unexpected argument ${REST[0]} (see --help)"; }
