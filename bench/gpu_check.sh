#!/usr/bin/env bash
# GPU check, run on the device machine from anywhere: every GPU test of the project
# (pytest -m gpu tests/), the kernel and pipeline benchmarks (the copy ceiling measured in
# the same run) and the real-model example in bf16. Results go to $OUT (default
# /tmp/embxfer-gpu-check), eleven files, no sub-folders:
#   gpu-check.log (everything printed), kernels-<device>.json/.png, graph-probe-<device>.json,
#   pipeline-<device>.json/.png, items-<device>.json, rows-probe-<device>.json, views-<device>.json,
#   steady.jsonl,
#   vlm-<device>.json
#   (and pipeline-<device>-before.json/.png with GPU_CHECK_BEFORE)
# Arguments are passed to bench/kernels.py (e.g. --sweep, --cases ab).
# GPU_CHECK_SKIP_TESTS=1 skips the tests, GPU_CHECK_SKIP_BENCH=1 the benchmarks,
# GPU_CHECK_SKIP_PIPELINE=1 the pipeline and items benchmarks, GPU_CHECK_SKIP_VLM=1 the example;
# GPU_CHECK_TESTS names the test paths (default: tests/). GPU_CHECK_BEFORE=DIR (an export of
# an older commit, e.g. `git archive C | tar -x -C DIR`) runs that code's pipeline benchmark
# right after this code's, in the same call (pipeline-<device>-before.json): compare the two
# there, never with another machine's run.
# Order: what a short call needs most comes first (tests, the pipeline, then kernels).
#
# The package is not installed there: a sitecustomize maps the three rooms under the
# embxfer namespace exactly as pyproject.toml does (embxfer=embxfer/,
# embxfer.kernels=kernels/, embxfer.control=control/, embxfer.runtime=runtime/).
# Test dependencies missing there are installed from wheels in .whl/ when present
# (see /work/.library/device/README.md for how to fetch them).
set -u -o pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/embxfer-gpu-check}
mkdir -p "$OUT"
PKG=$(mktemp -d /tmp/embxfer-pkg.XXXXXX)
# A sitecustomize on PYTHONPATH puts a finder first on sys.meta_path that maps the
# four package names onto the repository's folders, whatever else is on sys.path
# (pytest puts the repository root there, whose embxfer/ folder lacks the rooms).
# It is inherited by every python3 the tests start. An existing sitecustomize still runs.
ORIGINAL_SITECUSTOMIZE=$(python3 -c 'import sitecustomize; print(sitecustomize.__file__)' 2>/dev/null || true)
cat >"$PKG/sitecustomize.py" <<PYTHON
"""Written by bench/gpu_check.sh: the embxfer package mapped as pyproject.toml maps it."""
import importlib.util

_spec = importlib.util.spec_from_file_location("_embxfer_rooms", "$REPO/bench/rooms.py")
_rooms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rooms)
_rooms.install("$REPO")
if "$ORIGINAL_SITECUSTOMIZE":
    exec(compile(open("$ORIGINAL_SITECUSTOMIZE").read(), "$ORIGINAL_SITECUSTOMIZE", "exec"))
PYTHON
SITE=""
if [ -d "$REPO/.whl" ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d /tmp/embxfer-site.XXXXXX)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$REPO"/.whl/*.whl || echo "gpu_check: wheel install failed" >&2
fi
export PYTHONPATH="$PKG${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$REPO"
python3 -c 'import torch, triton, embxfer.kernels, embxfer.runtime; print("torch", torch.__version__, "triton", triton.__version__, "embxfer.kernels from", embxfer.kernels.__file__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader || true

LOG="$OUT/gpu-check.log"
status=0
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
    # shellcheck disable=SC2086 # GPU_CHECK_TESTS is a list of paths
    timeout "${GPU_CHECK_TEST_TIMEOUT:-360}" python3 -m pytest -m gpu ${GPU_CHECK_TESTS:-tests/} -q -p no:cacheprovider -rs \
        --continue-on-collection-errors 2>&1 | tee -a "$LOG" | tail -25
    status=${PIPESTATUS[0]}
    echo "gpu tests exit status: $status" | tee -a "$LOG"
fi
if [ "${GPU_CHECK_SKIP_GROUPS:-0}" != 1 ]; then
    # embxfer's rendezvous, data pairs (gloo) and outsider tests on this machine's torch
    # (NCCL pairs need two GPUs: NCCL puts one rank per GPU)
    timeout 300 python3 -m pytest tests/runtime/test_two_engines.py \
        tests/reliability/test_outsiders.py::test_a_pair_whose_peer_lacks_the_secret_sends_nothing \
        -q -p no:cacheprovider -rs 2>&1 | tee -a "$LOG" | tail -5
    echo "groups tests exit status: ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
    if [ "${GPU_CHECK_SKIP_PIPELINE:-0}" != 1 ]; then
        python3 bench/pipeline.py --json "$OUT/pipeline-{device}.json" 2>&1 | tee -a "$LOG"
        pipeline_status=${PIPESTATUS[0]}
        echo "pipeline exit status: $pipeline_status" | tee -a "$LOG"
        [ "$pipeline_status" = 0 ] || status=$pipeline_status
        if [ -n "${GPU_CHECK_BEFORE:-}" ]; then
            echo "=== the code in ${GPU_CHECK_BEFORE} (before), same machine ===" | tee -a "$LOG"
            python3 bench/rooms.py "$GPU_CHECK_BEFORE" "$GPU_CHECK_BEFORE/bench/pipeline.py" \
                --json "$OUT/pipeline-{device}-before.json" 2>&1 | tee -a "$LOG"
            echo "pipeline (before) exit status: ${PIPESTATUS[0]}" | tee -a "$LOG"
        fi
    fi
    python3 bench/kernels.py --json "$OUT/kernels-{device}.json" "$@" 2>&1 | tee -a "$LOG"
    bench_status=${PIPESTATUS[0]}
    echo "kernels bench exit status: $bench_status" | tee -a "$LOG"
    [ "$bench_status" = 0 ] || status=$bench_status
    python3 bench/graph_probe.py --json "$OUT/graph-probe-{device}.json" 2>&1 | tee -a "$LOG"
    probe_status=${PIPESTATUS[0]}
    echo "graph probe exit status: $probe_status" | tee -a "$LOG"
    [ "$probe_status" = 0 ] || status=$probe_status
    if [ "${GPU_CHECK_SKIP_PIPELINE:-0}" != 1 ]; then
        python3 bench/items.py --device cuda --json "$OUT/items-{device}.json" 2>&1 | tee -a "$LOG"
        items_status=${PIPESTATUS[0]}
        echo "items bench exit status: $items_status" | tee -a "$LOG"
        [ "$items_status" = 0 ] || status=$items_status
        # requests as rows, both sides' usual steps, against the runtime in the same process
        python3 bench/rows_probe.py --json "$OUT/rows-probe-{device}.json" 2>&1 | tee -a "$LOG"
        rows_status=${PIPESTATUS[0]}
        echo "rows probe exit status: $rows_status" | tee -a "$LOG"
        [ "$rows_status" = 0 ] || status=$rows_status
        # what one output view and the outputs' allocation cost, each way to make them
        python3 bench/views.py --json "$OUT/views-{device}.json" 2>&1 | tee -a "$LOG"
        views_status=${PIPESTATUS[0]}
        echo "views bench exit status: $views_status" | tee -a "$LOG"
        [ "$views_status" = 0 ] || status=$views_status
        # the steady state rep by rep (graph captures, collector passes), the collector
        # as it is and frozen after set-up, alternating, each in a process of its own
        for mode in on setup on setup; do
            python3 bench/steady.py --gc "$mode" --out "$OUT/steady.jsonl" >>"$LOG" 2>&1
            steady_status=$?
            echo "steady ($mode) exit status: $steady_status" | tee -a "$LOG"
            [ "$steady_status" = 0 ] || status=$steady_status
        done
    fi
fi
if [ "${GPU_CHECK_SKIP_VLM:-0}" != 1 ]; then
    HF_HUB_OFFLINE=1 python3 examples/vlm/run.py --device cuda --dtype bf16 --json "$OUT/vlm-{device}.json" 2>&1 \
        | tee -a "$LOG" | tail -15
    vlm_status=${PIPESTATUS[0]}
    echo "vlm example exit status: $vlm_status" | tee -a "$LOG"
    [ "$vlm_status" = 0 ] || status=$vlm_status
fi
rm -rf "$PKG" ${SITE:+"$SITE"}
exit "$status"
