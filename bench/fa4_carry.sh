#!/usr/bin/env bash
# flash-attn-4 for the lent H200 (Python 3.12, torch 2.11 cu130), carried in two device calls.
#
# Its CUTLASS DSL runtime (nvidia-cutlass-dsl-libs-cu13, 92 MB) is larger than what one call carries (64 MiB with
# the working tree), so this script packs it as xz and splits it in two: .gpu/a holds part 1, .gpu/b part 2 and the
# small wheels. The Python `cutlass` package itself is nvidia-cutlass-dsl-libs-core (libs-base only holds
# cutlass/_mlir and iket: without libs-core, `import flash_attn.cute` fails with "No module named 'cutlass.cute'").
# The image already has what else it needs: cuda-bindings, cuda-pathfinder, triton, protobuf, einops.
#
#   bash bench/fa4_carry.sh                 # here (needs pip's index): fills .gpu/a and .gpu/b (git-ignored)
#
# Then two calls back to back (the machine stays warm 30 s between them; /tmp survives only while it does):
#   call A, carry [".gpu/a"]:  mkdir -p /tmp/keep && cp .gpu/a/* /tmp/keep/ && <the rest of the call>
#   call B, carry [".gpu/b"]:
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/*.whl &&
#     cat /tmp/keep/cu13.part.aa .gpu/b/cu13.part.ab | xz -dc | tar -xf - -C /tmp/site &&
#     export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:. &&
#     python3 -c "from streamgen.ops.attention import detect; print(detect())"   # flash_attn='flash_attn.cute...'
# (the wheels before the tar: pip --target skips a top-level folder that already exists.)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip_dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp/w" "$@"
}
pip_dl flash-attn-4==4.0.0b36 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5
mkdir -p "$tmp/cu13" && (cd "$tmp/cu13" && unzip -q "$tmp"/w/nvidia_cutlass_dsl_libs_cu13-*.whl)
rm "$tmp"/w/nvidia_cutlass_dsl_libs_cu13-*.whl
tar -C "$tmp/cu13" -cf - . | xz -T0 -6 > "$tmp/cu13.tar.xz"
size=$(stat -c %s "$tmp/cu13.tar.xz")
split -b $(( (size + 1) / 2 )) "$tmp/cu13.tar.xz" "$tmp/cu13.part."
rm -rf .gpu/a .gpu/b && mkdir -p .gpu/a .gpu/b
mv "$tmp/cu13.part.aa" .gpu/a/ && mv "$tmp/cu13.part.ab" .gpu/b/ && mv "$tmp"/w/*.whl .gpu/b/
du -sh .gpu/a .gpu/b
