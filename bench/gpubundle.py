"""`make gpu-bundle`: what a lent GPU machine lacks, in one ignored folder (.gpu/) of at most 60 MiB.

    python -m bench.gpubundle [--out .gpu] [--data DIR]

The GPU image (an H200 with PyTorch, no registry) has most of bench's runtime but not its privacy and metric
libraries. This writes, on a machine that reaches PyPI:

- .gpu/wheels/: the wheels of `BUNDLE` for CPython 3.12 manylinux x86-64, with `pip download --no-deps`, to be
  installed there with `--no-deps --no-index --target DIR` (never over the image's torch);
- .gpu/data/: the Fashion-MNIST IDX files (from Debian's dataset-fashion-mnist, or --data DIR).

`IMAGE` is the image's package list as the device tool documents it; tests/test_gpucheck.py checks that every
distribution bench's runtime modules import is in IMAGE or BUNDLE (with the requirements of BUNDLE's own).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

LIMIT_MIB = 60
# what the image lacks: the pins of pyproject.toml, and dm-tree for dp-accounting (the version our venv resolves)
BUNDLE = {
    "opacus": "1.6.0",
    "dp-accounting": "0.6.0",
    "dm-tree": "0.1.10",
    "torch-fidelity": "0.4.0",
    "xgboost-cpu": "3.2.0",
}
# Distributions bench imports that stay off the GPU on purpose, and why.
NOT_BUNDLED = {"ray": "the ray extra (--executor ray); gpu-check runs the local executor"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The GPU image's Python packages (the device tool's KINDS.md, read 2026-11-17; torch 2.11, torchvision 0.26).
_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
IMAGE = frozenset(_IMAGE_LIST.split())  # noqa: SIM905 (one name per word, as KINDS.md lists them)


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def download_wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(out)]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in BUNDLE.items()]
    subprocess.run(cmd, check=True)


def copy_fmnist(source: Path, out: Path) -> None:
    missing = [f for f in FMNIST_FILES if not (source / f).is_file()]
    if missing:
        raise SystemExit(
            f"gpu-bundle: {source} lacks {', '.join(missing)}; install dataset-fashion-mnist or pass --data DIR"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in FMNIST_FILES:
        shutil.copyfile(source / f, out / f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpubundle", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--data", type=Path, default=FMNIST_DIR, help="folder with the Fashion-MNIST IDX .gz files")
    a = p.parse_args(argv)
    try:
        download_wheels(a.out / "wheels")
    except subprocess.CalledProcessError as e:
        print(f"gpu-bundle: pip download failed (exit {e.returncode}); this needs a machine that reaches PyPI")
        return 1
    copy_fmnist(a.data, a.out / "data")
    total = size_mib(a.out)
    wheels = sorted(f.name for f in (a.out / "wheels").glob("*.whl"))
    print(f"gpu-bundle: {a.out} holds {len(wheels)} wheels and Fashion-MNIST, {total:.1f} MiB in all")
    for w in wheels:
        print(f"  {w}")
    if total > LIMIT_MIB:
        print(f"gpu-bundle: {total:.1f} MiB is over the {LIMIT_MIB} MiB a device call may carry with the code")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
