#!/usr/bin/env bash
# Brings a model file that is too big for one device call onto the GPU machine, one chunk per
# back-to-back call. Each call carries one folder holding one chunk and the SHA256SUMS list:
#     bash tools/chunk-step.sh .model/c3
# The chunk goes to $MODEL_DIR (default /tmp/model), which a warm machine keeps between calls.
# Before that, every earlier chunk must be there and intact: a machine that was handed back in
# between comes up empty, and the chunks must then be sent again from the first.
# Once all chunks are there they are joined and checked against the whole file's checksum and
# size; the file's path is then the only line on standard output (progress goes to stderr).
#
# SHA256SUMS: "HASH  model.gguf.partNN" per chunk, "HASH  NAME" for the joined file, and a
# comment "# bytes NAME SIZE" giving its size.
set -euo pipefail

die() { echo "chunk-step: $1" >&2; exit "${2:-1}"; }
recycled() { die "$1; machine was recycled: start over from the first chunk" 2; }

[ $# -eq 1 ] || die "usage: $0 CHUNK_FOLDER (a folder with one NAME.partNN and SHA256SUMS)"
src=$1
dest=${MODEL_DIR:-/tmp/model}
[ -f "$src/SHA256SUMS" ] || die "$src/SHA256SUMS is missing"

shopt -s nullglob
carried=("$src"/*.part[0-9][0-9])
shopt -u nullglob
[ ${#carried[@]} -eq 1 ] || die "$src must hold exactly one chunk, found ${#carried[@]}"
chunk=$(basename "${carried[0]}")

whole=$(awk '$1 == "#" && $2 == "bytes" {print $3}' "$src/SHA256SUMS")
size=$(awk '$1 == "#" && $2 == "bytes" {print $4}' "$src/SHA256SUMS")
if [ -z "$whole" ] || [ -z "$size" ]; then die "$src/SHA256SUMS has no '# bytes NAME SIZE' line"; fi
sum_of() { awk -v n="$1" '$1 !~ /^#/ && $2 == n {print $1}' "$2/SHA256SUMS"; }
mapfile -t parts < <(awk '$1 !~ /^#/ && $2 ~ /\.part[0-9][0-9]$/ {print $2}' "$src/SHA256SUMS" | sort)
[ ${#parts[@]} -gt 0 ] || die "$src/SHA256SUMS lists no chunks"
index=-1
for i in "${!parts[@]}"; do [ "${parts[$i]}" = "$chunk" ] && index=$i; done
[ "$index" -ge 0 ] || die "$chunk is not listed in $src/SHA256SUMS"

intact() {  # intact FILE EXPECTED_SHA256
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# A re-run after the join (for example a suite call that carries the last chunk again).
if [ -f "$dest/$whole" ] && [ -f "$dest/SHA256SUMS" ] && cmp -s "$src/SHA256SUMS" "$dest/SHA256SUMS"; then
    if [ "$(stat -c %s "$dest/$whole")" != "$size" ] || ! intact "$dest/$whole" "$(sum_of "$whole" "$dest")"; then
        die "$dest/$whole is damaged; remove $dest and start over"
    fi
    echo "chunk-step: $dest/$whole already joined and intact" >&2
    echo "$dest/$whole"
    exit 0
fi

if [ "$index" -eq 0 ]; then
    rm -rf "$dest"
    mkdir -p "$dest"
    cp "$src/SHA256SUMS" "$dest/SHA256SUMS"
else
    [ -f "$dest/SHA256SUMS" ] || recycled "$dest holds no earlier chunks"
    cmp -s "$src/SHA256SUMS" "$dest/SHA256SUMS" ||
        die "$src/SHA256SUMS differs from the one the earlier chunks came with: start over"
    for ((i = 0; i < index; i++)); do
        intact "$dest/${parts[$i]}" "$(sum_of "${parts[$i]}" "$dest")" ||
            recycled "${parts[$i]} is missing or damaged in $dest"
    done
fi

intact "$src/$chunk" "$(sum_of "$chunk" "$dest")" || die "$src/$chunk does not match its checksum"
# Moved, not copied: the carried copy would otherwise stay in the checkout on a warm machine.
mv -f "$src/$chunk" "$dest/$chunk.tmp" 2>/dev/null || cp -f "$src/$chunk" "$dest/$chunk.tmp"
mv -f "$dest/$chunk.tmp" "$dest/$chunk"
echo "chunk-step: $chunk in place ($((index + 1)) of ${#parts[@]})" >&2

for part in "${parts[@]}"; do
    [ -f "$dest/$part" ] || { echo "chunk-step: next: the folder holding $part" >&2; exit 0; }
done
# Every chunk was checked on arrival or above; join into a temporary name so that an
# interrupted join never leaves a file that looks complete.
(cd "$dest" && cat "${parts[@]}" >"$whole.tmp")
[ "$(stat -c %s "$dest/$whole.tmp")" = "$size" ] ||
    die "joined $whole has $(stat -c %s "$dest/$whole.tmp") bytes, expected $size"
intact "$dest/$whole.tmp" "$(sum_of "$whole" "$dest")" || die "joined $whole does not match its checksum"
mv -f "$dest/$whole.tmp" "$dest/$whole"
(cd "$dest" && rm -f "${parts[@]}")
echo "chunk-step: $dest/$whole joined, $size bytes, sha256 $(sum_of "$whole" "$dest")" >&2
echo "$dest/$whole"
