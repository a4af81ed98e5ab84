#!/usr/bin/env bash
# The whole product on the built-in dataset: data -> train -> evaluate -> export -> enroll -> query.
# Every step is one of the product's own commands, echoed before it runs. Called by `make demo`.
set -euo pipefail
OUT=${OUT:-runs/demo}
# torch's OpenMP threads spin only briefly before they sleep: with other work on the two cores,
# libgomp's default spinning made a training step 1.6-9x slower; quiet, this costs 2%, sleeping
# at once 21% (docs/demo.md, "Why the recipe is this size").
export GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-10000}
PER_CATEGORY=${PER_CATEGORY:-1700}
DATA=$OUT/data
CKPT=$DATA/runs/checkpoints/best.pt

# Echo a command, run it, say how long it took.
run() { printf '\n\033[1m$ %s\033[0m\n' "$*"; local t=$SECONDS; "$@"; printf '(%ds)\n' $((SECONDS - t)); }

t0=$(date +%s)
rm -rf "$OUT"
run stbir-train synth "$DATA" --per-category "$PER_CATEGORY" --test-per-category 100 --sketches-per-photo 1
run stbir-train --config "$DATA/config.yaml"
run stbir-train evaluate --config "$DATA/config.yaml" --checkpoint "$CKPT"
run stbir-export "$CKPT" "$OUT/export" --quantize int8

# The gallery a device would hold: the 400 held-out test photos, none seen in training.
for dir in "$DATA"/*/testB; do
  cat=$(basename "$(dirname "$dir")")
  mkdir -p "$OUT/gallery/$cat" && cp "$dir"/*.png "$OUT/gallery/$cat/"
done
run stbir-infer enroll --images "$OUT/gallery" --model "$OUT/export" --index "$OUT/index"

# Example queries from held-out sketches and captions, one per category; each prints where the
# true photo ranked and writes a contact sheet (sketch, caption, top-5 photos).
for dir in "$DATA"/*/testA; do
  cat=$(basename "$(dirname "$dir")")
  line=$(sed -n 3p "$DATA/$cat/test.txt")
  photo=${line%%$'\t'*}; caption=${line#*$'\t'}
  run stbir-infer query --model "$OUT/export" --index "$OUT/index" --top-k 5 \
      --sketch "$dir/${photo%.png}_0.png" --text "$caption" \
      --sheet "$OUT/sheets/$cat.png" --expect "$OUT/gallery/$cat/$photo"
done

printf '\ndemo finished in %ds; everything is under %s (contact sheets in %s/sheets)\n' \
  "$(( $(date +%s) - t0 ))" "$OUT" "$OUT"
