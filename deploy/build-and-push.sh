#!/usr/bin/env bash
# Builds council's images and pushes them; stops at the first failed build or push.
#
#   deploy/build-and-push.sh REGISTRY TAG [cpu|cuda|all]     (default: all)
#
# Images: REGISTRY/council:TAG (deploy/Dockerfile) and REGISTRY/council-cuda:TAG
# (deploy/Dockerfile.cuda, for the gpu overlay). Build output is shown in full
# (--progress=plain); nothing is silenced. CUDA_COMPUTE_CAP (default 80) picks the GPU
# generation the CUDA kernels are compiled for.
set -euo pipefail

if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
  echo "usage: $0 REGISTRY TAG [cpu|cuda|all]" >&2
  exit 2
fi
registry="$1"
tag="$2"
which="${3:-all}"
case "$which" in
  cpu | cuda | all) ;;
  *)
    echo "unknown image set: $which (cpu, cuda or all)" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.."

build_and_push() {
  local dockerfile="$1" image="$2"
  shift 2
  echo "==> building $image from $dockerfile"
  docker build --progress=plain --file "$dockerfile" --tag "$image" "$@" .
  echo "==> pushing $image"
  docker push "$image"
  docker image inspect --format '{{index .RepoDigests 0}}' "$image"
}

if [ "$which" = cpu ] || [ "$which" = all ]; then
  build_and_push deploy/Dockerfile "$registry/council:$tag"
fi
if [ "$which" = cuda ] || [ "$which" = all ]; then
  build_and_push deploy/Dockerfile.cuda "$registry/council-cuda:$tag" \
    --build-arg "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}"
fi
echo "==> done: set the overlay's image with"
echo "    (cd deploy/k8s/overlays/<overlay> && kustomize edit set image council=$registry/council:$tag)"
