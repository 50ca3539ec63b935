# Shortcuts; the README's two commands are what CI runs.
.PHONY: install test lint bench bench-gpu gpu-session wheels upstream demo gpu-versions

install:
	pip install torch==2.13.0 -e ".[test]"

test:
	python -m pytest -q -n 2 --dist loadfile

lint:
	ruff check .

bench:
	titok-fast bench -k cpu

bench-gpu:
	titok-fast bench -k "test_gpu or bench_kernels"

# On a GPU machine without network: the gpu tests and every GPU benchmark, results under $OUT or gpu-results/.
gpu-session:
	bash benchmarks/gpu_session.sh all

# Wheels for a GPU machine without network (Python 3.12, x86_64) of what it lacks; copy .wheels there (about
# 59 MiB; ruff is left out to keep it small, so the lint test skips there: it runs on every CPU).
# (pynvvideocodec: the NVDEC decoder of `encode --decoder nvdec`, optional; einops and omegaconf: upstream's own
# code, for the benchmarks' provider `upstream`. No dependencies: omegaconf's one, PyYAML, is on that machine's
# image, and its wheel, 0.8 MiB, was most of the margin under 64 MiB.)
# Versions pinned: the working tree and .wheels travel to that machine within 64 MiB together, checked below.
wheels:
	pip download av==19.0.2 omegaconf==2.4.0 einops==0.8.2 pynvvideocodec==2.2.4 --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wheels
	pip download pytest-xdist==3.8.0 execnet==2.1.2 pytest-timeout==2.4.0 --no-deps -d .wheels  # (pytest is there already)
	@total=$$(( $$(du -sb .wheels | cut -f1) + $$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb | tail -1 | cut -f1) )); \
		echo "working tree + .wheels: $$((total / 1048576)) MiB of 64"; [ $$total -le 67108864 ]

# Upstream's model code (branch old-variableComp: model/ and configs/) from a git clone of it at $(UPSTREAM_GIT), into
# .upstream/ (ignored; about 100 KB), to carry to a GPU machine without network beside .wheels: there,
# TITOK_UPSTREAM=.upstream bash benchmarks/gpu_session.sh encode runs the provider `upstream` too.
upstream:
	@[ -n "$(UPSTREAM_GIT)" ] || { echo "set UPSTREAM_GIT to a git clone of upstream (TiTok-Video)"; exit 2; }
	rm -rf .upstream && mkdir -p .upstream
	git -C "$(UPSTREAM_GIT)" archive old-variableComp model configs | tar -x -C .upstream
	test -f .upstream/model/titok.py

demo:
	titok-fast demo

# The suite on this CPU under the GPU machine's versions (Python 3.12, torch 2.11, Triton 3.6, PyAV 19), in a venv of
# its own (.venv-gpu-versions, ignored): a version difference shows here, not in a GPU visit's few minutes (torch
# 2.11's Dynamo refused two calls that 2.13's takes; see benchmarks/RESULTS.md). NumPy below 2.4: Triton 3.6's
# interpreter cannot run the kernel tests with a later one. PYTHON312: a Python 3.12 to make the venv with.
PYTHON312 ?= python3.12
GPU_VERSIONS = torch==2.11.0 triton==3.6.0 av==19.0.2 "numpy<2.4"
gpu-versions:
	[ -x .venv-gpu-versions/bin/python ] || $(PYTHON312) -m venv .venv-gpu-versions
	printf '%s\n' $(GPU_VERSIONS) > .venv-gpu-versions/constraints.txt
	.venv-gpu-versions/bin/pip install -q -c .venv-gpu-versions/constraints.txt $(GPU_VERSIONS) -e ".[test]"
	.venv-gpu-versions/bin/python -m pytest -q -n 2 --dist loadfile
