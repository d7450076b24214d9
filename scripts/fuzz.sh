#!/usr/bin/env bash
# Fuzzes one target (or all of them, one after another) with AFL++ through cargo-afl on stable
# Rust: builds fuzz/afl, seeds from fuzz/corpus/TARGET, runs afl-fuzz for SECONDS under `nice`,
# copies new crashes to fuzz/regressions/TARGET and prints the run's statistics. See FUZZING.md.
#
#   scripts/fuzz.sh TARGET SECONDS [--minimise]
#   scripts/fuzz.sh all SECONDS [--minimise]
#
# --minimise replaces fuzz/corpus/TARGET with `cargo afl cmin` of the run's queue (seeds keep
# their names). Output goes to $FUZZ_OUT (default target/afl/fuzz-out/TARGET); the build to
# $CARGO_TARGET_DIR/afl (default target/afl).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() {
  echo "usage: scripts/fuzz.sh TARGET|all SECONDS [--minimise]" >&2
  echo "targets: $(targets | tr '\n' ' ')" >&2
  exit 2
}
targets() { ls fuzz/afl/src/bin | sed 's/\.rs$//'; }

[[ $# -ge 2 ]] || usage
target=$1
seconds=$2
minimise=no
[[ ${3:-} == --minimise ]] && minimise=yes
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "SECONDS must be a positive number, not \`$seconds\`" >&2; usage; }
if [[ $target != all && ! -f fuzz/afl/src/bin/$target.rs ]]; then
  echo "unknown target \`$target\`" >&2
  usage
fi

# cargo-afl builds AFL++ itself (`cargo afl config --build`), so no host package is needed.
if ! cargo afl --version >/dev/null 2>&1; then
  echo "==> cargo-afl is missing: installing it with \`cargo install --locked cargo-afl\`"
  cargo install --locked cargo-afl
fi
# `afl-fuzz -h` exits 1 even when it is there; its usage line tells that it is.
afl_help=$(cargo afl fuzz -h 2>&1 || true)
if [[ $afl_help != *"[ options ]"* ]]; then
  echo "==> building AFL++ for cargo-afl (\`cargo afl config --build\`)"
  cargo afl config --build
fi

build_dir="${CARGO_TARGET_DIR:-$root/target}/afl"
echo "==> cargo afl build --release (in fuzz/afl, into $build_dir)"
(cd fuzz/afl && CARGO_TARGET_DIR=$build_dir cargo afl build --release --quiet)

stat() { sed -n "s/^$1 *: *//p" "$2"; }

# Replaces the found inputs of the corpus with those of the queue that keep its edge coverage
# (`afl-cmin -e`), named by content. Leaves the corpus alone if cmin keeps nothing.
minimise_into_corpus() {
  local name=$1 queue=$2 min=$3 bin=$4 corpus=$5
  echo "==> cargo afl cmin $name"
  rm -rf "$min"
  # afl-cmin sizes its map from one test run; a larger map keeps edges other inputs reach.
  AFL_MAP_SIZE=65536 AFL_SKIP_CPUFREQ=1 nice -n 19 cargo afl cmin -e -i "$queue" -o "$min" -- "$bin" \
    >"$min.log" 2>&1 || true
  if [[ -z $(ls -A "$min" 2>/dev/null) ]]; then
    echo "cargo afl cmin kept no input (see $min.log); fuzz/corpus/$name is unchanged" >&2
    return 0
  fi
  # Seeds (`seed-*`) always stay; earlier finds are replaced by this run's minimised ones.
  rm -f "$corpus"/found-*
  local f
  for f in "$min"/*; do
    [[ $(basename "$f") == *orig:seed-* ]] && continue
    cp "$f" "$corpus/found-$(sha256sum "$f" | cut -c1-16)"
  done
  echo "$name: fuzz/corpus/$name now holds $(ls "$corpus" | wc -l) inputs"
}

fuzz_one() {
  local name=$1
  local corpus=$root/fuzz/corpus/$name
  local regressions=$root/fuzz/regressions/$name
  local out=${FUZZ_OUT:-$build_dir/fuzz-out}/$name
  local bin=$build_dir/release/$name
  if [[ -z $(ls -A "$corpus" 2>/dev/null) ]]; then
    echo "fuzz/corpus/$name is missing or empty: add seeds first (see FUZZING.md)" >&2
    exit 1
  fi
  rm -rf "$out"
  mkdir -p "$out" "$regressions"
  echo "==> afl-fuzz $name for ${seconds}s (output in $out)"
  # -m: an input that makes a target allocate by what it claims shows up as a crash.
  AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
    AFL_SKIP_CRASHES=1 \
    nice -n 19 cargo afl fuzz -V "$seconds" -m 1024 -i "$corpus" -o "$out" -- "$bin" \
    >"$out/afl-fuzz.log" 2>&1 || {
      echo "afl-fuzz $name failed; the end of its log:" >&2
      tail -n 30 "$out/afl-fuzz.log" >&2
      exit 1
    }
  local run=$out/default
  local new=0
  for crash in "$run"/crashes/id:*; do
    [[ -e $crash ]] || continue
    local sum
    sum=$(sha256sum "$crash" | cut -c1-16)
    if [[ ! -e $regressions/crash-$sum ]]; then
      cp "$crash" "$regressions/crash-$sum"
      new=$((new + 1))
    fi
  done
  local stats=$run/fuzzer_stats
  printf '%s: execs_done=%s corpus_count=%s corpus_found=%s saved_crashes=%s saved_hangs=%s run_time=%ss execs_per_sec=%s bitmap_cvg=%s new_regressions=%s\n' \
    "$name" "$(stat execs_done "$stats")" "$(stat corpus_count "$stats")" \
    "$(stat corpus_found "$stats")" "$(stat saved_crashes "$stats")" \
    "$(stat saved_hangs "$stats")" "$(stat run_time "$stats")" \
    "$(stat execs_per_sec "$stats")" "$(stat bitmap_cvg "$stats")" "$new"
  if [[ $new -gt 0 ]]; then
    echo "$name: $new new crash input(s) in fuzz/regressions/$name; replay them with" \
      "\`cargo test -p fuzz-targets --test replay\`" >&2
  fi
  if [[ $minimise == yes ]]; then
    minimise_into_corpus "$name" "$run/queue" "$out/cmin" "$bin" "$corpus"
  fi
}

if [[ $target == all ]]; then
  for name in $(targets); do fuzz_one "$name"; done
else
  fuzz_one "$target"
fi
