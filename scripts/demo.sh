#!/usr/bin/env bash
# demo.sh: the README's main job, run by `./dev demo` after the build. `rlb demo` starts a
# bridge and two workers on the CPU backend with the built-in tiny model and trains it with
# the toy trainer; where a build has no `rlb demo` yet, it generates from a fixture
# checkpoint instead.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
rlb=build/rlb
if "$rlb" help | grep -q '^  demo '; then
    exec "$rlb" demo "$@"
fi
echo "demo: this build has no 'rlb demo'; generating from tests/fixtures/llama_gqa instead" >&2
exec "$rlb" generate --model tests/fixtures/llama_gqa --prompt-ids 1,2,3,4 --max-tokens 16 \
    --temperature 0.8 --seed 7 --n 2 "$@"
