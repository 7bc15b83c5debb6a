#!/usr/bin/env bash
# The GPU runs of this round, as steps that back-to-back device calls share. Run from the
# repository root on the GPU machine:
#
#     bash tools/gpu-steps.sh STEP [STEP...]
#
# Steps (each bounded; a failing step is reported and the next still runs):
#   setup            GPU kit (carried .devkit/), carried wheels (.whl/), GSM8K data
#                    (.model/gsm8k/ -> /tmp/gsm8k), the machine's facts
#   chunk:DIR        one chunk of the model (tools/chunk-step.sh DIR)
#   smoke            the accuracy suite on the tiny model, every backend, CUDA graphs
#   main1, main2     the default main job (hidden 4096, world size 2), timed, twice, with
#                    benchmarks/phase_timer.py's line of where the time went
#                    (PYTEST_ALLREDUCE_TIMING, when set, overrides the timing plan)
#   regret           benchmarks/regret.py on main1's config, 1..8192 tokens
#   versus           benchmarks/vs_nccl_tests.py (builds nccl-tests from .tools/nccl-tests), our
#                    side also under nccl-tests' shape (50 ops x 20 launches per sample) and
#                    4 launches per sample, nccl-tests also with one thread per GPU
#   versus-mpi       benchmarks/vs_nccl_tests.py with nccl-tests also built with MPI and run as
#                    one process per GPU (MPICH from the carried .mpi/mpich-*.whl, unpacked
#                    into /tmp/mpich); our side first with nccl-tests' workload (its shape,
#                    50 ops x 20 launches; its buffer rotation, rotate=64M; its memory,
#                    memory=ncclmem), then that workload in the suite's shape, nccl-tests'
#                    shape without ncclMemAlloc, and the suite's own plan
#   bare-probe       benchmarks/nccl_bare_probe.py: raw NCCL, same buffers / nccl-tests'
#                    rotation / ncclMemAlloc buffers / both
#   profile          benchmarks/profile_checks.py: what each check of the table costs per call
#                    through the engine and inside the ranks, with rank 0's profile
#   jit              FlashInfer's compiled modules on this machine; those beyond the kit's
#                    packed as $OUT/jit-extra.tar.xz (setup unpacks .jit/*.tar.xz when carried)
#   profile-graph    benchmarks/profile_checks.py on the graph and stress checks, by phase
#   profile-timing   benchmarks/profile_checks.py --timings: the latency suite's work per size
#   checked-step     benchmarks/checked_step.py: one checked step's cost on one GPU, eager and
#                    as a graph replay (THEN_CHECKS: an older checks.py to compare with)
#   probe            benchmarks/pynccl_probe.py
#   invariance       benchmarks/timing_invariance.py
#   gsm8k            the accuracy suite on the joined GGUF, all 1319 questions, every backend
#                    or those GSM8K_BACKENDS names (GSM8K_LIMIT_S bounds it, default 540 s)
#
# Everything is written under /tmp/gpu-work, which a warm machine keeps between calls; at the
# end the whole folder goes to $OUT as one archive (the device tool returns at most 8 files).
set -u
work=/tmp/gpu-work
mkdir -p "$work"
status=0
here=$(pwd)

step() {
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=20 "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$work/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - began)) s" | tee -a "$work/steps.txt"
    [ "$rc" -eq 0 ] || status=1
}

main_job() {  # main_job NAME: the README's main command, from an empty folder, timed
    local name=$1
    rm -rf "${work:?}/$name"
    mkdir -p "$work/$name"
    cd "$work/$name" && PYTHONPATH="$here/benchmarks:${PYTHONPATH:-}" python3 -m pytest \
        --pyargs pytest_allreduce.suites -p no:cacheprovider -p phase_timer \
        -rfE --durations=30 --allreduce-output-dir="$work/$name/out"
}

for what in "$@"; do
    case $what in
        setup)
            source tools/device-env.sh || exit 3
            # Wheels and GSM8K only where carried: the main job needs neither (its accuracy
            # suite skips without --allreduce-gsm8k-data), and the call's tree stays small.
            if [ -d .whl ]; then step wheels 120 bash tools/install-wheels.sh; fi
            if [ -d .model/gsm8k ]; then
                mkdir -p /tmp/gsm8k && cp .model/gsm8k/*.jsonl /tmp/gsm8k/ &&
                    (cd .model/gsm8k && sha256sum -c --quiet SHA256SUMS) || status=1
            fi
            # FlashInfer modules this repo's runs JIT-build beyond the kit's (the `jit` step
            # packs them on a machine that built them), when carried in .jit/.
            for extra in .jit/*.tar.xz; do
                [ -f "$extra" ] && tar -xJf "$extra" -C "$HOME/.cache" && echo "jit cache: $extra"
            done
            {
                date -u
                nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
                nvidia-smi topo -m
                ls /proc/driver/nvidia/gpus && grep -h Model /proc/driver/nvidia/gpus/*/information
                python3 -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
                python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
                python3 -c "import importlib.metadata as m; print('sgl-kernel', m.version('sglang-kernel'))" 2>&1 | tail -1
                env | grep -E 'NCCL_NVLS|MULTICAST|NVSHMEM_DISABLE' | sort
                nproc
            } >"$work/env.txt" 2>&1
            cat "$work/env.txt" ;;
        chunk:*)
            step "chunk-$(basename "${what#chunk:}")" 120 bash tools/chunk-step.sh "${what#chunk:}" ;;
        smoke)
            source tools/device-env.sh || exit 3
            step smoke 240 bash -c "mkdir -p $work/smoke && cd $work/smoke && python3 -m pytest \
                --pyargs pytest_allreduce.suites -k accuracy -p no:cacheprovider -rfEs \
                --allreduce-gsm8k-data=/tmp/gsm8k --allreduce-gsm8k-limit=32 \
                --allreduce-output-dir=$work/smoke/out" ;;
        main1 | main2)
            source tools/device-env.sh || exit 3
            step "$what" 420 bash -c "$(declare -f main_job); work=$work; here=$here; main_job $what" ;;
        regret)
            source tools/device-env.sh || exit 3
            config=$(ls "$work"/main1/out/tp2/allreduce_config_hidden=4096,device=*.json | grep -v ',tp=' | head -1)
            step regret 300 python3 benchmarks/regret.py "$config" --max-tokens 8192 \
                --json "$work/regret-h4096.json" ;;
        versus)
            source tools/device-env.sh || exit 3
            step versus 480 python3 benchmarks/vs_nccl_tests.py --tools .tools/nccl-tests \
                --threads-run --also-timing ops=50,launches=20,samples=8 \
                --also-timing launches=4,samples=8 --out "$work/versus" ;;
        versus-mpi)
            source tools/device-env.sh || exit 3
            # The wheel's files, as they are: pip would place its data folder by its own scheme.
            python3 -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/mpich')" \
                .mpi/mpich-*.whl || { echo "no MPICH wheel in .mpi/"; status=1; continue; }
            mpi_home=$(ls -d /tmp/mpich/mpich-*.data/data)
            chmod +x "$mpi_home"/bin/*
            step versus-mpi 540 python3 benchmarks/vs_nccl_tests.py --tools .tools/nccl-tests \
                --mpi-home "$mpi_home" \
                --timing ops=50,launches=20,samples=8,rotate=64M,memory=ncclmem \
                --also-timing rotate=64M,memory=ncclmem \
                --also-timing ops=50,launches=20,samples=8,rotate=64M --out "$work/versus-mpi" ;;
        bare-probe)
            source tools/device-env.sh || exit 3
            step bare-probe 240 python3 benchmarks/nccl_bare_probe.py --out "$work/bare-probe" ;;
        profile)
            source tools/device-env.sh || exit 3
            step profile 240 python3 benchmarks/profile_checks.py --device cuda \
                --backends nccl,custom_ar,flashinfer_fusion_one_shot --sizes 1,256,504 \
                --checks numerics::exact_sum,numerics::rounded_sum,numerics::edge_values,numerics::fused_job,graph::graph_replays \
                --repeat 3 --out "$work/profile"
            step profile-stress 120 python3 benchmarks/profile_checks.py --device cuda \
                --backends nccl,custom_ar --checks stress::back_to_back --repeat 1 \
                --out "$work/profile-stress" ;;
        jit)
            # What FlashInfer has compiled on this machine so far, its JIT log's end, and the
            # modules beyond the kit's two packed for .jit/ (whole-module folders only).
            cache=$(ls -d "$HOME"/.cache/flashinfer/*/*/cached_ops 2>/dev/null | head -1)
            {
                du -sh "$cache"/* 2>&1
                tail -n 15 "$(dirname "$cache")/flashinfer_jit.log" 2>&1
            } | tee "$work/jit.txt"
            extra=$(cd "$cache" && ls | grep -v -x -e vllm_comm -e trtllm_comm)
            if [ -n "$extra" ]; then
                rel=${cache#"$HOME"/.cache/}
                tar -cJf "$OUT/jit-extra.tar.xz" -C "$HOME/.cache" \
                    $(for m in $extra; do echo "$rel/$m"; done) && ls -la "$OUT/jit-extra.tar.xz"
            fi ;;
        profile-graph)
            source tools/device-env.sh || exit 3
            step profile-graph 240 python3 benchmarks/profile_checks.py --device cuda \
                --backends nccl,custom_ar,vllm_custom_ar,flashinfer_fusion_one_shot \
                --sizes 1,504,4032 --checks graph::graph_replays,numerics::exact_sum \
                --repeat 3 --top 45 --sort cumulative --phases --out "$work/profile-graph"
            step profile-stress 120 python3 benchmarks/profile_checks.py --device cuda \
                --backends nccl,flashinfer_fusion_one_shot --checks stress::back_to_back \
                --repeat 1 --top 30 --sort cumulative --phases --out "$work/profile-stress" ;;
        profile-timing)
            source tools/device-env.sh || exit 3
            step profile-timing 240 python3 benchmarks/profile_checks.py --device cuda \
                --backends nccl,pynccl,custom_ar,vllm_custom_ar,torch_symm_mem_one_shot,torch_symm_mem_two_shot,flashinfer_trtllm,flashinfer_fusion_one_shot,flashinfer_fusion_two_shot,flashinfer_fusion_one_shot_fp8 \
                --checks none --timings allreduce,fused --sizes 1,504,4032 --repeat 2 --top 40 --phases \
                --out "$work/profile-timing" ;;
        checked-step)
            source tools/device-env.sh || exit 3
            step checked-step 300 python3 benchmarks/checked_step.py \
                ${THEN_CHECKS:+--then "$THEN_CHECKS"} --out "$work/checked-step" ;;
        probe)
            source tools/device-env.sh || exit 3
            step probe 240 python3 benchmarks/pynccl_probe.py --out "$work/probe" ;;
        invariance)
            source tools/device-env.sh || exit 3
            # INVARIANCE_ARGS: other sizes or op counts (e.g. --sizes 4M,32M --ops 4,8,200).
            # shellcheck disable=SC2086
            step invariance 240 python3 benchmarks/timing_invariance.py ${INVARIANCE_ARGS:-} \
                --out "$work/invariance" ;;
        gsm8k)
            source tools/device-env.sh || exit 3
            # The joined model (the chunk:... step of the same call joins the last chunk).
            # GSM8K_NAME (default gsm8k) names the log and folder, so that runs of several
            # backend groups in back-to-back calls keep their own.
            name=${GSM8K_NAME:-gsm8k}
            step "$name" "${GSM8K_LIMIT_S:-540}" bash -c "mkdir -p $work/$name && cd $work/$name && python3 -m pytest \
                --pyargs pytest_allreduce.suites -k accuracy -p no:cacheprovider -rfEs \
                --durations=20 --allreduce-model=/tmp/model/model.gguf \
                ${GSM8K_BACKENDS:+--allreduce-backends=$GSM8K_BACKENDS} \
                --allreduce-gsm8k-data=/tmp/gsm8k --allreduce-output-dir=$work/$name/out" ;;
        *)
            echo "unknown step $what"; status=2 ;;
    esac
    cd "$here" || exit 3
done
tar czf "$OUT/gpu-work.tgz" -C "$work" --exclude='*.gguf' . 2>/dev/null
cp "$work/steps.txt" "$OUT/steps.txt" 2>/dev/null
exit $status
