"""`make gpu-check`: everything a lent GPU should measure, as one command that ends inside its time budget.

    python -m bench.gpucheck --out DIR [--device cuda] [--data-root DIR] [--budget 480]
    python -m bench.gpucheck --out DIR --device cpu --quick      # tiny settings: the test suite runs this
    python -m bench.gpucheck --out DIR --parts throughput --only dpdm,dpsad-e2e   # a rerun of what failed

It runs, in order, each part skipped with a note once the budget is spent:

1. the `gpu` tests (`pytest -m gpu`);
2. each method's training at the paper profile's settings on Fashion-MNIST's shape (bench.throughput: random
   images, a few timed units per stage after a warm-up): seconds per unit, units per second, peak GPU memory,
   seconds per sample; fp32 and bf16 where the method has a `precision` option; the DP step of dpdm against the
   non-private step of the same network (ddpm with dpdm's network fields, on as many rows per step);
3. a short real grid (`--profile gpu-short`: dpsad, dpsad-e2e, dpdm at fp32 and bf16, dpgan, dpmerf on fmnist
   at ε = 10) and its report;
4. `bench paper --estimate` for dpsad-eccv24 and dpdm-tmlr23 from the throughput just measured.

It writes at most four files under --out: summary.md (the figures), summary.json (the same, structured),
throughput.json (for `bench paper --estimate --throughput`) and gpu-check.tar.gz (logs, the grid's results
folder and report, the estimates).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import config, data
from bench.estimate import throughput_json
from bench.metrics.protocols import METRIC_PROTOCOL, ON_REQUEST
from bench.throughput import Measurement, has_precision, measure, measure_classifiers, resolve

GRID_METHODS = ("dpsad", "dpsad-e2e", "dpdm", "dpgan", "dpmerf")
# (label, method, sets): every method's training step at the paper's settings; dpsad with both denoisers
THROUGHPUT: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("dpsad (ddpm)", "dpsad", {"denoiser": "ddpm"}),
    ("dpsad (edm)", "dpsad", {"denoiser": "edm", "sampler": "edm-heun"}),  # the paper samples with DDPM's chain
    ("dpsad-e2e", "dpsad-e2e", {}),
    ("dpdm", "dpdm", {}),
    ("dpgan", "dpgan", {}),
    ("pategan", "pategan", {}),
    ("dpmerf", "dpmerf", {}),
    ("dphp", "dphp", {}),
    ("ddpm", "ddpm", {}),
)
# after ddpm with dpdm's network (the DP/non-private ratio): the other methods of the paper tables' estimates
LATER: tuple[tuple[str, str, dict[str, Any]], ...] = tuple((m, m, {}) for m in ("dpntk", "dpkernel", "gswgan", "gpate",
                                                                               "datalens"))  # fmt: skip
# --quick: the tiny profile's 16×16 data has no 7×7 level for the EDM denoiser's default attention
QUICK_SETS = {"dpsad (edm)": {"attention_resolutions": [8], "teacher_attention_resolutions": [8]}}
QUICK_METRICS = "fd_domain,acc_logreg"  # the quick grid's scoring (the full one scores gpu-short's metrics)
QUICK_GRID = ("dpdm", "dpmerf")  # the quick grid: the same command on fewer methods
PAPERS = ("dpsad-eccv24", "dpdm-tmlr23")
PARTS = ("tests", "throughput", "classifiers", "grid", "estimates")
FILES = ("summary.md", "summary.json", "throughput.json", "gpu-check.tar.gz")


class Settings:
    def __init__(self, quick: bool, device: torch.device, tests: Path) -> None:
        self.quick, self.device, self.tests = quick, device, tests
        tiny = str(tests / "profiles" / "tiny.toml")  # the test suite's profile: seconds on a CPU
        self.profile = tiny if quick else "paper"
        self.grid_profile = tiny if quick else "gpu-short"
        self.dataset = "synthetic" if quick else "fmnist"
        self.units, self.warmup = (2, 1) if quick else (4, 2)
        self.max_seconds = 5.0 if quick else 25.0
        self.sample_n = 8 if quick else 500


def _lines(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_command(cmd: list[str], log: Path, timeout: float, lines: int = 15) -> tuple[int, str]:
    """Run `cmd` in `log`'s folder (not the repository's root, whose bench/ would shadow the installed package), its
    output to `log`; (exit status, last lines). 124 when it ran past `timeout`."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, timeout), cwd=log.parent)
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = 124
        f.write(f"\n# exit {rc} after {time.perf_counter() - t0:.1f} s\n")
    return rc, _lines(log.read_text(), lines)


def gpu_tests(s: Settings, work: Path, timeout: float) -> dict[str, Any]:
    """`pytest -m gpu` on a copy of the tests and the pytest settings, outside the repository: the bench it tests
    is the installed one (on the GPU machine, the bundle's --target folder)."""
    copy = work / "suite"
    shutil.copytree(s.tests, copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(s.tests.parent / "pyproject.toml", copy / "pyproject.toml")
    # only the files that hold gpu tests: the others may import dev tools the GPU image lacks (playwright, ...)
    files = sorted(f"tests/{p.name}" for p in s.tests.glob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    rc, tail = run_command(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
        copy / "gpu-tests.log",
        timeout,
    )
    shutil.move(copy / "gpu-tests.log", work / "gpu-tests.log")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail)}
    return {"exit": rc, "counts": counts, "tail": tail}


def throughput(s: Settings, deadline: float, log: Path, only: tuple[str, ...] = ()) -> list[tuple[str, Measurement]]:
    """Each method at the paper's settings (fp32 and bf16 where it has the option), then ddpm with dpdm's network on
    dpdm's rows per step: the non-private reference of dpdm's DP step. `only`: the labels that start with one of
    these (all when empty)."""
    out: list[tuple[str, Measurement]] = []
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for label, method, sets in THROUGHPUT:
        sets = {**sets, **(QUICK_SETS.get(label, {}) if s.quick else {})}
        if has_precision(method):
            jobs += [(f"{label} fp32", method, {**sets, "precision": "fp32"}),
                     (f"{label} bf16", method, {**sets, "precision": "bf16"})]  # fmt: skip
        else:
            jobs.append((label, method, sets))
    dpdm = resolve("dpdm", s.dataset, profile=s.profile, epsilon=10.0)
    ddpm_fields = {f for f in config.to_jsonable(resolve("ddpm", s.dataset, profile=s.profile, epsilon=10.0))}
    same_net = {k: v for k, v in config.to_jsonable(dpdm).items() if k in ddpm_fields and k not in ("epochs", "lr")}
    rows = dpdm.physical_batch_size * dpdm.noise_multiplicity  # the rows of one chunk of dpdm's step
    rows = min(rows, 128) if s.quick else rows
    same_net |= {"batch_size": rows, "epochs": 10 * rows / data.spec_without_files(s.dataset).num_train}
    jobs.append(("ddpm with dpdm's network", "ddpm", same_net))
    jobs += LATER
    jobs = [job for job in jobs if not only or job[0].startswith(only)]
    with log.open("w") as f:
        for label, method, sets in jobs:
            if time.perf_counter() > deadline:
                f.write(f"{label}: skipped, the time budget is spent\n")
                continue
            cfg = resolve(method, s.dataset, profile=s.profile, epsilon=10.0, sets=sets)
            try:
                m = measure(method, s.dataset, cfg, device=s.device, units=s.units, warmup=s.warmup,
                            max_seconds=s.max_seconds, sample_n=s.sample_n)  # fmt: skip
            except Exception as e:  # one method's failure must not cost the others' figures
                f.write(f"{label}: FAILED {type(e).__name__}: {e}\n")
                continue
            f.write(f"{label}: {json.dumps(m.to_json(), default=str)}\n")
            f.flush()
            out.append((label, m))
    return out


def classifiers(s: Settings, log: Path) -> list[dict[str, Any]]:
    """Seconds per sample·epoch of every downstream classifier (bench.throughput.measure_classifiers), for the
    estimates' scoring column; [] if it fails (the log says why). --quick leaves out the on-request ones
    (DPImageBench's ResNet-110, WRN-40-4 and ResNeXt-29: minutes on a CPU even at its tiny settings)."""
    metrics = [m for m in METRIC_PROTOCOL if not (s.quick and m in ON_REQUEST)]
    try:
        rows = measure_classifiers(metrics, s.dataset, device=s.device, n=256 if s.quick else 4096)
    except Exception as e:  # the other figures must still come back
        log.write_text(f"FAILED {type(e).__name__}: {e}\n")
        return []
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def dp_ratio(measured: list[tuple[str, Measurement]]) -> dict[str, Any] | None:
    """dpdm's rows per second (B·K per DP step) over the non-private ddpm's on the same network, per precision."""
    ref = dict(measured).get("ddpm with dpdm's network")
    if ref is None or not ref.stages or ref.stages[0]["seconds_per_unit"] is None:
        return None
    ref_rows = ref.config["batch_size"] / ref.stages[0]["seconds_per_unit"]
    out = {}
    for label, m in measured:
        if label.startswith("dpdm") and m.stages and m.stages[0]["seconds_per_unit"]:
            rows = m.config["batch_size"] * m.config["noise_multiplicity"] / m.stages[0]["seconds_per_unit"]
            out[label] = {"dp_rows_per_s": rows, "nonprivate_rows_per_s": ref_rows, "ratio": rows / ref_rows}
    return out


def grid(s: Settings, work: Path, timeout: float, data_root: str | None) -> dict[str, Any]:
    results, reports = work / "results", work / "reports"
    methods = QUICK_GRID if s.quick else GRID_METHODS
    cmd = [sys.executable, "-m", "bench.cli", "run", "--methods", ",".join(methods), "--eps", "10",
           "--dataset", s.dataset, "--profile", s.grid_profile, "--results", str(results),
           "--device", s.device.type, "--sweep", "dpdm.precision=fp32,bf16"]  # fmt: skip
    if data_root:
        cmd += ["--data-root", data_root]
    if s.quick:
        cmd += ["--metrics", QUICK_METRICS]
    t0 = time.perf_counter()
    rc, tail = run_command(cmd, work / "grid.log", timeout, lines=30)
    seconds = time.perf_counter() - t0
    if results.is_dir():
        run_command([sys.executable, "-m", "bench.cli", "report", "--results", str(results), "--out", str(reports)],
                    work / "report.log", 300)  # fmt: skip
    return {"exit": rc, "seconds": seconds, "tail": tail}


def estimates(s: Settings, work: Path, throughput_file: Path, timeout: float) -> dict[str, str]:
    out = {}
    for paper in PAPERS:
        rc, tail = run_command(
            [sys.executable, "-m", "bench.cli", "paper", paper, "--estimate", "--throughput", str(throughput_file),
             "--profile", s.profile, "--out", str(work / "estimates")],
            work / f"estimate-{paper}.log", timeout,
        )  # fmt: skip
        md = work / "estimates" / f"estimate-{paper}.md"
        out[paper] = md.read_text() if rc == 0 and md.exists() else f"exit {rc}: {tail}"
    return out


def summary_md(info: dict[str, Any]) -> str:
    lines = [f"# gpu-check on {info['device_name']} ({info['mode']})", ""]
    lines += [f"- {k}: {info[k]}" for k in ("torch", "python", "commit", "seconds")]
    t = info.get("tests")
    lines += ["", "## gpu tests", "", f"exit {t['exit']}: {t['counts']}" if t else "skipped (see Skipped)"]
    settings = (
        "the tiny test profile, 16×16 synthetic data"
        if info["mode"] == "quick"
        else ("paper settings, Fashion-MNIST's shape")
    )
    lines += ["", f"## Training throughput ({settings})", ""]
    lines += ["| run | stage | units/s | s/unit | peak GiB | s/sample | note |", "|---|---|---|---|---|---|---|"]
    for row in info["throughput"]:
        for st in row["stages"] or [{"description": "—", "seconds_per_unit": None}]:
            spu = st["seconds_per_unit"]
            peak = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "—"
            sps = f"{row['sample_seconds']:.4f}" if row["sample_seconds"] is not None else "—"
            lines.append(f"| {row['label']} | {st['description'][:48]} | {1 / spu:.3g} | {spu:.4g} | {peak} | {sps} | "
                         f"{row['error']} |" if spu else f"| {row['label']} | {st['description'][:48]} | — | — | "
                         f"{peak} | {sps} | {row['error']} |")  # fmt: skip
    lines += ["", "## Downstream classifiers (seconds per training sample and epoch)", ""]
    lines += [f"- {c['metric']}: {c['seconds_per_sample_epoch']:.3g} (start-up {c.get('startup_s', 0.0):.3g} s)"
              for c in info.get("classifiers") or []]  # fmt: skip
    lines += [
        "",
        "## dpdm's DP step against the non-private step of the same network (rows per second)",
        "",
        "The reference is ddpm in fp32 (it has no precision option) on dpdm's network and rows per chunk.",
        "",
    ]
    for label, r in (info.get("dp_ratio") or {}).items():
        dp, plain = r["dp_rows_per_s"], r["nonprivate_rows_per_s"]
        lines.append(f"- {label}: {dp:.4g} against {plain:.4g} = {r['ratio']:.3f}×")
    g = info.get("grid")
    lines += ["", "## Short grid", ""]
    lines += [f"exit {g['exit']} after {g['seconds']:.0f} s", "", "```", g["tail"], "```"] if g else ["skipped"]
    for paper, text in (info.get("estimates") or {}).items():
        lines += ["", f"## Estimate: {paper}", "", text]
    lines += ["", "## Skipped", ""] + [f"- {x}" for x in info["skipped"]] if info["skipped"] else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpucheck", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the files (at most four)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny settings (the test suite's CPU check of this script)")
    p.add_argument("--data-root", type=Path, default=None, help="folder of the Fashion-MNIST IDX files (the bundle's)")
    p.add_argument("--tests", type=Path, default=Path("tests"), help="the repository's tests folder (default ./tests)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    p.add_argument("--commit-file", type=Path, default=None, help="the commit when no .git is at hand (.gpu/commit)")
    p.add_argument("--parts", default=",".join(PARTS), help="the parts to run, comma-separated (default: all)")
    p.add_argument(
        "--only", default="", help="throughput: only the labels starting with one of these (comma-separated)"
    )
    a = p.parse_args(argv)
    parts = {x for x in a.parts.split(",") if x}
    if parts - set(PARTS):
        print(f"gpu-check: --parts: unknown {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
        return 2
    t0 = time.perf_counter()
    deadline = t0 + a.budget
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: --device cuda but torch sees no CUDA device (use --device cpu --quick on a CPU)")
        return 2
    s = Settings(a.quick, torch.device(a.device), a.tests.resolve())
    data_root = str(a.data_root.resolve()) if a.data_root else None
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("BENCH_CACHE", str(work / "cache"))
    info: dict[str, Any] = {
        "mode": "quick" if a.quick else "full",
        "device_name": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _commit(a.commit_file),
        "skipped": [],
    }
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    info["skipped"] += [f"{part}: not asked for (--parts)" for part in PARTS if part not in parts]
    info["tests"] = gpu_tests(s, work, min(150.0, left())) if "tests" in parts else None
    # the grid gets ~45 % of what is left after the tests, the throughput the rest (both stop at their share)
    share = 0.45 if "grid" in parts else 0.0
    only = tuple(x for x in a.only.split(",") if x)
    measured = (throughput(s, time.perf_counter() + (1 - share) * left(), work / "throughput.log", only)
                if "throughput" in parts else [])  # fmt: skip
    info["throughput"] = [{"label": label, **m.to_json()} for label, m in measured]
    info["dp_ratio"] = dp_ratio(measured)
    info["classifiers"] = classifiers(s, work / "classifiers.log") if "classifiers" in parts and left() > 90 else []
    if not info["classifiers"] and "classifiers" in parts:
        info["skipped"].append("downstream classifiers' timing: the time budget was spent or it failed")
    throughput_file = a.out / "throughput.json"
    table = throughput_json([m for _, m in measured], str(s.device), info["classifiers"])
    throughput_file.write_text(json.dumps(table, default=str))
    if "grid" in parts:
        if left() > 60:
            info["grid"] = grid(s, work, left() - 30, data_root)
        else:
            info["skipped"].append("short grid: the time budget was spent")
    if "estimates" in parts:
        if left() > 15:
            info["estimates"] = estimates(s, work, throughput_file, max(10.0, left() - 5))
        else:
            info["skipped"].append("estimates: the time budget was spent")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (a.out / "summary.json").write_text(json.dumps(info, indent=1, default=str))
    text = summary_md(info)
    (a.out / "summary.md").write_text(text)
    with tarfile.open(a.out / "gpu-check.tar.gz", "w:gz") as tar:
        for name in ("gpu-tests.log", "throughput.log", "classifiers.log", "grid.log", "report.log", "results",
                     "reports", "estimates",
                     *(f"estimate-{p}.log" for p in PAPERS)):  # fmt: skip
            if (work / name).exists():
                tar.add(work / name, arcname=name, filter=_no_checkpoints)
    print(text)
    return 0


def _no_checkpoints(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Model checkpoints stay behind (the results folder's figures, samples and records travel)."""
    return None if member.name.endswith((".pt", ".ckpt")) else member


def _commit(commit_file: Path | None = None) -> str:
    """The checkout's commit; on a lent machine (no .git: bench is installed from a copy of the tree) the one
    `make gpu-bundle` wrote beside the wheels."""
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        found = ""
    if not found and commit_file is not None and commit_file.is_file():
        found = f"{commit_file.read_text().strip()} (when the bundle was made)"
    return found or "unknown"


if __name__ == "__main__":
    sys.exit(main())
