#!/usr/bin/env bash
# A user's catalogue: PNG files in class directories (exported from the test
# split), indexed with a trained run's model and queried by image file.
#   tests/cli/index_catalogue.sh DTRAIN RUN_DIR WORK_DIR
set -euo pipefail
dtrain=$1 run=$2 work=$3
rm -rf "$work"
"$dtrain" data export-png --split test --limit 300 --out "$work/png"
"$dtrain" index build "$run" --gallery "$work/png" --kind flat --out "$work/index" --no-progress | tee "$work/build.out"
grep -q "FLAT index of 300 images" "$work/build.out"
grep -q "10 labelled sub-directories" "$work/index/manifest.textproto"
"$dtrain" index query "$work/index" --image "$work/png/Trouser/test_2.png" -k 3 --json | tee "$work/q.json"
# The query image is in the catalogue: it comes back first, with its metadata.
python3 - "$work/q.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
top = r["neighbors"][0]
assert top["source"] == "Trouser/test_2.png", top
assert top["label_name"] == "Trouser", top
assert top["score"] > 0.999, top
print("index_catalogue: ok")
PY
# A colour image in the catalogue is refused, naming it, and the index stays.
printf 'P6 1 1 255\n\x00\x00\x00' > "$work/png/Bag/colour.ppm"
cp "$work/png/Bag/colour.ppm" "$work/png/Bag/colour.pgm"
if "$dtrain" index build "$run" --gallery "$work/png" --kind flat --out "$work/index" --no-progress 2>"$work/err"; then
  echo "a catalogue with a colour image was accepted" >&2; exit 1
fi
cat "$work/err"
grep -q "colour.pgm: is a colour PPM" "$work/err"
grep -q "FLAT index of 300 images" <("$dtrain" index info "$work/index")
