# Build helpers of the device A/B scripts (sourced by device_ab.sh, device_ab_paged.sh,
# device_cycles.sh and device_traces.sh, which set OUT): every variant builds in its own copy of its source tree, all at
# the same time, so a stale extension in a tree can never stand in for a failed build.

# A fresh copy of DIR without build outputs; prints its path.
copy_tree() {
  local copy; copy=$(mktemp -d) &&
    (cd "$1" && tar --exclude=./build --exclude=./ab --exclude=./out --exclude=./.venv --exclude=./.peers \
      --exclude='*.so' -cf - .) | tar -x -C "$copy" && echo "$copy"
}

# start_build NAME SRC FLAGS HEAD_DIMS DEST: builds a copy of SRC with NVCC_APPEND_FLAGS=FLAGS and
# BSA_HEAD_DIMS=HEAD_DIMS in the background; the extension goes to DEST, the log and the exit status
# to $OUT/build_NAME.log and .rc. `wait` for them.
start_build() {
  local copy; copy=$(copy_tree "$2") || return 1
  (cd "$copy" && NVCC_APPEND_FLAGS="$3" BSA_HEAD_DIMS="$4" python3 setup.py build_ext --inplace \
     > "$OUT/build_$1.log" 2>&1
   echo $? > "$OUT/build_$1.rc"
   mkdir -p "$5" && cp blocksparse_attn/_C*.so "$5/" 2>/dev/null
   rm -rf "$copy") &
}

# check_build NAME LABEL: true if build NAME succeeded, else prints "LABEL: build failed" and its errors.
check_build() {
  [[ "$(cat "$OUT/build_$1.rc" 2>/dev/null)" == 0 ]] && return 0
  echo "$2: build failed"; grep -i error "$OUT/build_$1.log" | head
  return 1
}

# test_build EXT TREE LOG [VAR=value ...]: the extension built into EXT goes into TREE, whose
# TEST_FILE (default tests/test_prefill_kernels.py; several, space-separated; -k TEST_K, default
# "not D256") then runs there with those variables (under TEST_RUNNER, if set), its output in LOG;
# false if the tests failed.
test_build() {
  local ext=$1 tree=$2 log=$3; shift 3
  cp "$ext"/_C*.so "$tree"/blocksparse_attn/ || { echo "tests: no build in $ext" > "$log"; return 1; }
  # shellcheck disable=SC2086
  (cd "$tree" && env "$@" DEVICE=cuda PYTHONPATH="$PWD" timeout "${TEST_TIMEOUT:-300}" ${TEST_RUNNER:-} \
     python3 -m pytest -q -p no:cacheprovider ${TEST_FILE:-tests/test_prefill_kernels.py} \
     -k "${TEST_K:-not D256}") > "$log" 2>&1
}

# sanitize_build TOOL EXT TREE LOG: test_build under compute-sanitizer --tool TOOL, with -k
# SANITIZE_K (default TEST_K); false on a reported error or a failed test.
sanitize_build() {
  local tool=$1; shift
  TEST_RUNNER="compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20" \
    TEST_K="${SANITIZE_K:-${TEST_K:-not D256}}" test_build "$@"
}

# build_lines EXTRA_FLAGS: builds every line of BUILDS (default one line, no flags) into
# $ext/<line index> (ext: a fresh directory it makes), all at once, with EXTRA_FLAGS after each
# line's NVCC flags and BSA_HEAD_DIMS (default 128); a line "@DIR flags" builds a copy of the tree
# DIR (e.g. a branch's checkout at ab/<name>). About 48 compilers at once in all (three builds of 16
# each ran fine on the 16-core, 128 GB machine). Sets the array `builds`; false, with the line named,
# if a build failed.
build_lines() {
  local extra=$1 i src flags jobs
  ext=$(mktemp -d)
  mapfile -t builds < <(printf '%s\n' "${BUILDS:-}")
  [[ ${#builds[@]} -gt 0 ]] || builds=("")
  jobs=$(( 48 / ${#builds[@]} )); (( jobs > 16 )) && jobs=16; (( jobs < 2 )) && jobs=2
  export MAX_JOBS=${MAX_JOBS:-$jobs}
  for i in "${!builds[@]}"; do
    src=. flags=${builds[$i]}
    if [[ $flags == @* ]]; then
      src=${flags%% *} && src=${src#@}
      [[ $flags == *" "* ]] && flags=${flags#* } || flags=""
      [[ -f $src/setup.py ]] || { echo "build $i: no source tree at $src"; return 1; }
    fi
    start_build "$i" "$src" "$flags${extra:+ $extra}" "${BSA_HEAD_DIMS:-128}" "$ext/$i"
  done
  wait
  for i in "${!builds[@]}"; do check_build "$i" "build $i (${builds[$i]:-no flags})" || return 1; done
}
