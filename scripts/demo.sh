#!/usr/bin/env bash
# demo.sh: the README's main job, run by `./dev demo` after the build: `rlb demo` starts a
# bridge and two workers on the CPU backend with the built-in tiny model and trains it with
# the toy trainer, printing one line per step. Arguments go to `rlb demo` (see --help).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
exec build/rlb demo "$@"
