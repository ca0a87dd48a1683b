#!/usr/bin/env bash
# CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds the CPU extension (BSA_FORCE_CPU=1, BSA_DEBUG=1: -O0 -g) with -fsanitize=address,undefined in
# a scratch copy of the working tree, so the normal .venv install is left alone, then runs the tests
# that drive the C++ the hardest (argument checks, KV-cache ops, attention ops, edge cases, inference
# mode, determinism, the backend, the ci fuzz profile) against that copy. Exits nonzero on a failing
# test or on any sanitizer report. Needs a git checkout (the copy is what `git ls-files` lists).
#
#   PY=...                  the Python whose torch builds and runs it (default: .venv/bin/python)
#   BSA_SANITIZE_DIR=...    where the copy and the logs go (default: a fresh mktemp -d, removed on success)
#   BSA_FUZZ_EXAMPLES=300   examples per fuzz test (the ci profile's count; ~30 s of the run here)
#   MAX_JOBS=2              parallel compile jobs
#
# The sanitized build is -O0 and instrumented; torch itself is not, so ASan sees our code's accesses
# and every torch allocation and memcpy (its malloc/memcpy interceptors), not torch's own loads.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$root/.venv/bin/python}
CXX=${CXX:-c++}  # torch's build helpers compile with $CXX, else c++: libasan must be that compiler's
work=${BSA_SANITIZE_DIR:-$(mktemp -d /tmp/bsa-sanitize.XXXXXX)}
export BSA_FUZZ_EXAMPLES=${BSA_FUZZ_EXAMPLES:-300}
tests=(tests/test_bad_inputs.py tests/test_kv_cache_ops.py tests/test_attention_ops.py tests/test_edge_cases.py
       tests/test_inference_mode.py tests/test_determinism.py tests/test_backend.py tests/test_fuzz.py)
start=$SECONDS

echo "== sanitize_cpu: copying the working tree to $work"
rm -rf "$work/src" "$work/logs"  # a reused BSA_SANITIZE_DIR: no stale sources or logs
mkdir -p "$work/src" "$work/logs"
# Tracked and untracked-but-not-ignored files: what the tree would commit, with no build outputs.
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$work/src"

echo "== sanitize_cpu: building with -fsanitize=address,undefined (-O0 -g)"
# setuptools appends CFLAGS / LDFLAGS to the compile and link commands, and torch's ninja build keeps
# them. -fno-omit-frame-pointer: whole stacks in the reports.
san="-fsanitize=address,undefined -fno-omit-frame-pointer"
(cd "$work/src" && BSA_DEBUG=1 BSA_FORCE_CPU=1 CFLAGS="$san" LDFLAGS="$san" MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --inplace > "$work/logs/build.txt" 2>&1) || {
  tail -n 60 "$work/logs/build.txt"; echo "sanitize_cpu: the sanitized build failed"; exit 1; }
so=$(ls "$work"/src/blocksparse_attn/_C*.so)
symbols=$(nm -D "$so")  # not piped into grep -q: its early exit would fail nm under pipefail
if ! grep -q __asan_report <<< "$symbols" || ! grep -q __ubsan_handle <<< "$symbols"; then
  echo "sanitize_cpu: $so carries no ASan/UBSan instrumentation (were CFLAGS/LDFLAGS dropped?)"; exit 1
fi
echo "   built in $((SECONDS - start)) s"

echo "== sanitize_cpu: ${tests[*]}"
# libasan must be the first library of the process (python is not instrumented): LD_PRELOAD. Python
# and torch keep allocations for the life of the process, so leak detection would only report those.
# libstdc++ is preloaded too: python does not link it, and ASan's __cxa_throw interceptor must find
# it at start-up, or the first C++ exception (every TORCH_CHECK that fails) aborts in a CHECK.
# Reports go to the terminal (UBSan ignores log_path when ASan shares the process) and to
# logs/tests.txt, which is searched for them afterwards; --capture=sys leaves fd 2 alone, so pytest
# cannot swallow a report, not even one printed by a process that ASan then aborts. UBSan recovers:
# every distinct report is printed and the run fails at the end. ASan stops at its first report.
preload="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)"
run_start=$SECONDS
set +e
(
  cd "$work/src"
  export LD_PRELOAD="$preload" ASAN_OPTIONS="detect_leaks=0:halt_on_error=1" UBSAN_OPTIONS="print_stacktrace=1" \
    PYTHONPATH="$work/src" DEVICE=cpu
  "$PY" -c "import blocksparse_attn, sys; sys.exit(0 if blocksparse_attn.__file__.startswith('$work/src/') else
            'sanitize_cpu: imported ' + blocksparse_attn.__file__ + ', not the sanitized copy')" &&
  "$PY" -m pytest -q -p no:cacheprovider --capture=sys --durations=5 "${tests[@]}"
) 2>&1 | tee "$work/logs/tests.txt"
status=${PIPESTATUS[0]}
set -e
echo "   tests ran in $((SECONDS - run_start)) s (pytest exit $status)"

reports=$(grep -cE 'runtime error: |ERROR: AddressSanitizer|Sanitizer: CHECK failed|SUMMARY: [A-Za-z]*Sanitizer' \
          "$work/logs/tests.txt" || true)
if [ "$reports" -ne 0 ]; then
  echo "sanitize_cpu: FAILED, $reports sanitizer report line(s) above (log kept in $work/logs/tests.txt)"
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize_cpu: FAILED, the tests failed under the sanitizers, with no sanitizer report (kept in $work)"
  exit 1
fi
echo "sanitize_cpu: OK, no sanitizer report ($((SECONDS - start)) s in all)"
[ -n "${BSA_SANITIZE_DIR:-}" ] || rm -rf "$work"
