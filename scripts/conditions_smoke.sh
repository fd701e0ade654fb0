#!/usr/bin/env bash
# Every measuring command under a condition with an intervention, tiny settings, on one bundled model:
#   bash scripts/conditions_smoke.sh gemma3-270m      # prints "<command> ok" or "<command> FAILED (rc)"
# Logs and run directories go to runs/smoke/<model>-<command>.log and runs/smoke/<model>/<command>/.
set -u
cd "$(dirname "$0")/.."
m=${1:-gemma3-270m}
S=.venv/bin/sinkscope
C=(--condition add --condition "add+scale:0.5@2-4")
o=runs/smoke/$m
mkdir -p "$o"
run() { local name=$1; shift; if "$@" --quiet > "$o-$name.log" 2>&1; then echo "$name ok"; else echo "$name FAILED ($?)"; fi; }
run scan $S scan --model "$m" "${C[@]}" --limit 3 --out "$o/scan"
run keys $S keys --model "$m" "${C[@]}" --max-tokens 96 --out "$o/keys"
run smoothing $S smoothing --model "$m" "${C[@]}" --limit 3 --out "$o/smoothing"
run noop $S noop --model "$m" "${C[@]}" --limit 3 --out "$o/noop"
run conditional $S conditional-heads --model "$m" "${C[@]}" --out "$o/conditional"
run matrix $S matrix-entropy --model "$m" "${C[@]}" --limit 2 --out "$o/matrix"
run rank $S rank-collapse --model "$m" "${C[@]}" --limit 2 --out "$o/rank"
run massive $S massive --model "$m" "${C[@]}" --limit 2 --out "$o/massive"
run perturb $S perturb --model "$m" "${C[@]}" --out "$o/perturb"
run spread $S spread --model "$m" "${C[@]}" --limit 3 --out "$o/spread"
run oversquash $S oversquash --model "$m" "${C[@]}" --probes 2 --max-tokens 32 --no-path-sum --out "$o/oversquash"
run ablate $S ablate --model "$m" "${C[@]}" --window 64 --max-windows 1 --out "$o/ablate"
run knockout $S knockout --model "$m" --window 64 --max-windows 1 --layers 0 --no-per-head --out "$o/knockout"
run generate $S generate --model "$m" "${C[@]}" --max-new-tokens 4 --out "$o/generate"
run passkey $S passkey --model "$m" "${C[@]}" --length 256 --depth 0.5 --trials 1 --out "$o/passkey"
run ruler $S ruler --model "$m" "${C[@]}" --length 256 --trials 1 --task niah_single --out "$o/ruler"
run stream $S stream --model "$m" "${C[@]}" --length 80 --window 32 --out "$o/stream"
run kv $S kv --model "$m" "${C[@]}" --no-quant --press window --ratio 0.5 --protect 0 --max-windows 1 --window 64 \
    --context 32 --passkey-length 0 --out "$o/kv"
