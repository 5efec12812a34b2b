"""The GPU bundle, `make gpu-check`'s script in its CPU mode, the work counts and `bench paper --estimate`."""

from __future__ import annotations

import ast
import contextlib
import json
import math
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement

from bench import config, data, estimate, gpubundle, gpucheck
from bench.contract import NullProgress
from bench.errors import BenchError
from bench.grid import paper_plan, registry
from bench.metrics.protocols import METRIC_PROTOCOL, ON_REQUEST
from bench.privacy import Budget
from bench.report import paper
from bench.throughput import Enough, cost_key
from bench.training import poisson_rate, steps_for
from tests.conftest import TINY_PROFILE, bench

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = [ROOT / "bench", ROOT / "methods", ROOT / "baselines"]
METHODS = ("dpdm", "ddpm", "dpsad", "dpsad-e2e", "dpsad-teacher", "dpgan", "pategan", "dpmerf", "dphp")


def imported_top_levels() -> set[str]:
    names: set[str] = set()
    for folder in RUNTIME:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"bench", "__future__"}


def test_the_bundle_holds_every_distribution_the_runtime_imports_that_the_gpu_image_lacks() -> None:
    """Every third-party module imported anywhere in bench, methods or baselines (lazy imports too) comes from a
    distribution in the GPU image or in the bundle; so do the requirements of the bundle's own wheels."""
    dists_of = metadata.packages_distributions()
    names = imported_top_levels()
    assert {"torch", "opacus", "dp_accounting", "torch_fidelity"} <= names  # the scan sees the imports
    have = gpubundle.IMAGE | {gpubundle.normalize(n) for n in gpubundle.BUNDLE} | set(gpubundle.NOT_BUNDLED)
    missing = {}
    for name in sorted(names):
        dists = {gpubundle.normalize(d) for d in dists_of.get(name, [name])}
        if not dists & have:
            missing[name] = sorted(dists)
    for dist in gpubundle.BUNDLE:
        for raw in metadata.requires(dist) or []:
            req = Requirement(raw)
            env = {"python_version": "3.12", "extra": ""}
            applies = req.marker is None or req.marker.evaluate(env)
            if applies and gpubundle.normalize(req.name) not in have:
                missing[f"{dist} requires"] = [req.name]
    assert not missing, f"not in the GPU image nor in gpubundle.BUNDLE: {missing}"


def test_the_bundle_pins_what_pyproject_pins() -> None:
    """The GPU runs the versions the CPU tests ran: each bundled wheel's version is the project's pin (or the one
    installed here, for a dependency the project does not pin)."""
    pins = {}
    text = (ROOT / "pyproject.toml").read_text()
    for line in text.split("dependencies = [", 1)[1].split("]", 1)[0].splitlines():
        if "==" in line:
            name, version = line.strip().strip('",').split("#")[0].strip().strip('",').split("==")
            pins[gpubundle.normalize(name)] = version
    for name, version in gpubundle.BUNDLE.items():
        assert version == pins.get(gpubundle.normalize(name), metadata.version(name)), name


class Recording(NullProgress):
    """Records each stage's total; stops a fit at its first unit, except inside a shared stage (which must end)."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self.inside_shared = False

    def start(self, total: int, description: str = "") -> None:
        self.totals.append(int(total))

    def advance(self, n: int = 1) -> None:
        if n > 0 and not self.inside_shared:
            raise Enough

    def shared(self, name: str, ident: dict[str, Any], build: Any) -> dict[str, Any]:
        self.inside_shared = True
        try:
            return build(self)
        finally:
            self.inside_shared = False


@pytest.mark.parametrize("method", METHODS)
def test_work_counts_the_units_the_fit_announces(method: str, train) -> None:
    """`work` (what --estimate multiplies) equals the totals the fit itself passes to progress.start, stage by
    stage, at ε = 1 and 10 (PATE-GAN's count depends on ε)."""
    cls = registry.get(method)
    for eps in (1.0, 10.0):
        e = math.inf if cls.guarantee == "none" else eps
        cfg, _ = config.resolve(cls.Config, profile=config.load_profile(TINY_PROFILE), method=method,
                                dataset="synthetic", epsilon=e, sets={})  # fmt: skip
        budget = Budget.unlimited(1e-5) if math.isinf(e) else Budget(epsilon=e, delta=1e-5)
        model = cls(cfg, spec=train.spec, device=torch.device("cpu"))
        progress = Recording()
        with contextlib.suppress(Enough):  # raised at the first unit outside a shared stage
            model.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=progress)
        assert list(cls.work(cfg, len(train), budget).values()) == progress.totals


def _plan(paper_id: str, profile: str = "smoke") -> paper.PaperPlan:
    known = paper.load_papers()
    return paper_plan.plan_paper(paper.get_paper(known, paper_id), known, paper.load_published(known), profile=profile,
                            seeds=[0])  # fmt: skip


def _measurement(spec: Any, seconds_per_unit: list[float], sample_seconds: float) -> dict[str, Any]:
    return {"method": spec.method, "dataset": "fmnist", "precision": "default", "device": "cuda", "error": "",
            "config": spec.config_json, "sample_seconds": sample_seconds, "sample_n": 8, "peak_memory_gib": 1.0,
            "seconds": 1.0, "stages": [{"description": "x", "units": 1, "timed_units": 2, "seconds_per_unit": s}
                                       for s in seconds_per_unit]}  # fmt: skip


def test_the_estimate_is_units_times_seconds_per_unit_plus_samples_times_seconds_per_sample() -> None:
    plan = _plan("dpdm-tmlr23")
    dpdm = [s for s in plan.specs if s.method == "dpdm"]
    assert {s.dataset for s in dpdm} == {"mnist", "fmnist"}
    fm = next(s for s in dpdm if s.dataset == "fmnist")
    th = estimate.Throughput("cuda", (_measurement(fm, [0.5], 0.01),))
    frame, _ = estimate.estimate(dpdm, th, device=torch.device("cpu"))
    # by hand: the smoke profile's dpdm (batch 256, 0.5 epochs) on 60,000 records: 0.5 / (256 / 60000) = 117.2
    assert fm.config_json["batch_size"] == 256 and fm.config_json["epochs"] == 0.5
    steps = 117
    for row in frame.itertuples():  # MNIST has FMNIST's shape and size: the same measurement stands for it
        assert row.train_s == pytest.approx(steps * 0.5)
        assert row.sample_s == pytest.approx(fm.eval.n_gen * 0.01)
        assert row.gpu_h == pytest.approx((steps * 0.5 + fm.eval.n_gen * 0.01) / 3600)
    assert "GPU-h" in estimate.to_markdown(frame, "t", "cuda") and "CPU-h" in estimate.to_markdown(frame, "t", "cpu")


def test_the_estimate_adds_the_stages_and_refuses_a_measurement_of_another_config() -> None:
    plan = _plan("dpsad-eccv24")
    sad = next(s for s in plan.specs if s.method == "dpsad" and s.dataset == "fmnist")
    work = estimate.work_of(sad)
    assert list(work) == ["teacher steps", "student dp steps"]
    q = poisson_rate("b", sad.config_json["batch_size"], 60000)
    assert work["student dp steps"] == steps_for(sad.config_json["epochs"], q)
    th = estimate.Throughput("cuda", (_measurement(sad, [0.1, 2.0], 0.0),))
    row = estimate.cell_row(sad, th.find(sad.method, sad.dataset, sad.config_json), th)
    assert row["train_s"] == pytest.approx(work["teacher steps"] * 0.1 + work["student dp steps"] * 2.0)
    other = {**sad.config_json, "base_channels": sad.config_json["base_channels"] * 2}  # another network: another cost
    assert th.find(sad.method, sad.dataset, other) is None
    # only the count differs: the same cost per unit
    longer = {**sad.config_json, "epochs": sad.config_json["epochs"] * 3}
    assert th.find(sad.method, sad.dataset, longer) is not None
    assert cost_key(longer) == cost_key(sad.config_json)
    assert estimate.cell_row(sad, None, th)["status"] == "no measurement of this config"


def test_the_shared_teacher_is_counted_once_in_its_own_row() -> None:
    """dpsad's cells of a seed load the teacher the dpsad-teacher row trains: their rows count the student only, and
    the teacher row takes the teacher stage of the dpsad measurement (gpu-check times dpsad, not the teacher alone)."""
    plan = _plan("dpsad-eccv24")
    specs = [s for s in plan.specs if s.dataset == "fmnist" and s.method in ("dpsad", "dpsad-teacher")]
    assert sorted(s.method for s in specs) == ["dpsad", "dpsad", "dpsad-teacher"]  # ε = 1 and 10, one teacher
    sad = next(s for s in specs if s.method == "dpsad")
    work = estimate.work_of(sad)
    th = estimate.Throughput("cuda", (_measurement(sad, [0.1, 2.0], 0.01),))
    frame, _ = estimate.estimate(specs, th, device=torch.device("cpu"))
    rows = {r.method: r for r in frame.itertuples()}
    for r in frame[frame.method == "dpsad"].itertuples():
        assert r.train_s == pytest.approx(work["student dp steps"] * 2.0)
        assert r.status == "teacher steps: shared, in its own row"
    assert rows["dpsad-teacher"].train_s == pytest.approx(work["teacher steps"] * 0.1)
    assert math.isnan(rows["dpsad-teacher"].sample_s) and "sampling not measured" in rows["dpsad-teacher"].status
    # without the teacher's row (a plan of dpsad alone) each dpsad run trains its own teacher
    alone, _ = estimate.estimate([sad], th, device=torch.device("cpu"))
    assert alone.train_s[0] == pytest.approx(work["teacher steps"] * 0.1 + work["student dp steps"] * 2.0)


def test_the_estimate_adds_each_downstream_classifier_as_epochs_times_samples_times_seconds() -> None:
    """By hand: the smoke profile's DPDM protocol trains acc_cnn 10 epochs (its [eval.dpdm]) on the run's 1,000
    samples (60,000 + 10,000 asked, capped at n_gen), once (classifier_seeds 1): 10 × 1,000 × 1e-4 s = 1 s."""
    plan = _plan("dpdm-tmlr23")
    fm = next(s for s in plan.specs if s.method == "dpdm" and s.dataset == "fmnist")
    timing = {"metric": "acc_cnn", "dataset": "fmnist", "device": "cuda", "samples": 4096, "epochs": 1,
              "seconds_per_sample_epoch": 1e-4}  # fmt: skip
    th = estimate.Throughput("cuda", (_measurement(fm, [0.5], 0.01),), (timing,))
    found = th.find(fm.method, fm.dataset, fm.config_json)
    row = estimate.cell_row(fm, found, th, ["fd_domain", "acc_cnn"])
    assert row["score_s"] == pytest.approx(10 * 1000 * 1e-4) and row["status"] == ""
    assert row["gpu_h"] == pytest.approx((117 * 0.5 + 1000 * 0.01 + 1.0) / 3600)
    row = estimate.cell_row(fm, found, th, ["acc_cnn", "acc_logreg"])  # acc_logreg not timed: said, not counted
    assert row["score_s"] == pytest.approx(1.0) and "classifiers not measured: acc_logreg" in row["status"]


def test_a_classifiers_start_up_is_timed_apart_from_its_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each classifier is timed for e and 2e epochs: the difference is its epochs, the rest its start-up (a clock that
    reads 3 s of start-up + 0.5 s an epoch must give both back); the estimate adds the start-up once per seed."""
    from bench import throughput

    runs: list[tuple[str, Any]] = []

    def clock(device: torch.device, call: Any) -> float:  # the protocol's resolved settings, without training
        runs.append((call.args[0][0], call.keywords["settings"].get("epochs")))
        return 3.0 + 0.5 * call.keywords["settings"].get("epochs", 1) + (0.0 if not noisy else -10.0 * len(runs))

    noisy = False
    monkeypatch.setattr(throughput, "_seconds", clock)
    cnn, logreg = throughput.measure_classifiers(
        ["acc_cnn", "acc_logreg_sklearn"], "fmnist", device=torch.device("cpu"), n=100
    )
    assert [r[1] for r in runs] == [1, 2, None]  # the CNN twice; scikit-learn has no epochs: once
    assert cnn["separated"] and cnn["startup_s"] == pytest.approx(3.0)
    assert cnn["seconds_per_sample_epoch"] == pytest.approx(0.5 / 100)
    assert not logreg["separated"] and logreg["startup_s"] == 0.0 and logreg["seconds_per_sample_epoch"] > 0
    noisy = True  # the longer run timed faster: no separation, the longer run's mean epoch, start-up 0
    (cnn,) = throughput.measure_classifiers(["acc_cnn"], "fmnist", device=torch.device("cpu"), n=100)
    assert not cnn["separated"] and cnn["startup_s"] == 0.0

    plan = _plan("dpdm-tmlr23")
    fm = next(s for s in plan.specs if s.method == "dpdm" and s.dataset == "fmnist")
    timing = {"metric": "acc_cnn", "dataset": "fmnist", "seconds_per_sample_epoch": 1e-4, "startup_s": 7.0}
    th = estimate.Throughput("cuda", (_measurement(fm, [0.5], 0.01),), (timing,))
    row = estimate.cell_row(fm, th.find(fm.method, fm.dataset, fm.config_json), th, ["acc_cnn"])
    assert row["score_s"] == pytest.approx(7.0 + 10 * 1000 * 1e-4)  # start-up + 10 epochs × 1,000 samples


def test_paper_estimate_from_a_throughput_file_prints_and_writes_gpu_hours(tmp_path: Path) -> None:
    plan = _plan("dpdm-tmlr23")
    fm = next(s for s in plan.specs if s.method == "dpdm" and s.dataset == "fmnist")
    th = tmp_path / "throughput.json"
    th.write_text(json.dumps({"format": 1, "device": "cuda", "measurements": [_measurement(fm, [0.5], 0.01)]}))
    r = bench(*["paper", "dpdm-tmlr23", "--estimate", "--throughput", str(th), "--profile", "smoke",
                "--out", str(tmp_path / "est")])  # fmt: skip
    assert r.exit_code == 0, r.output
    runs = sum(s.method == "dpdm" for s in plan.specs)  # the table's other methods' runs: no measurement in the file
    assert f"GPU-h** for the {runs} run(s) estimated" in r.stdout  # every dpdm run: MNIST's take FMNIST's figure
    md, csv = tmp_path / "est" / "estimate-dpdm-tmlr23.md", tmp_path / "est" / "estimate-dpdm-tmlr23.csv"
    assert md.read_text().strip() in r.stdout
    assert csv.read_text().count("\n") == len(plan.specs) + 1  # every run has its row, estimated or not


def test_without_a_throughput_file_each_distinct_config_is_timed_once_on_the_device() -> None:
    """The --estimate path without --throughput: one timing per distinct (method, data, cost) config, then the same
    arithmetic (the timing itself is bench.throughput.measure, run for real by the gpu-check test)."""
    specs = [s for s in _plan("dpdm-tmlr23").specs if s.method == "dpdm"]  # the table's dpdm runs
    calls: list[tuple[str, str]] = []

    def fake_measure(method: str, dataset: str, cfg: Any, **kw: Any) -> Any:
        calls.append((method, dataset))
        spec = next(s for s in specs if s.method == method and s.dataset == dataset)
        m = _measurement(spec, [0.25], 0.002)
        return type("M", (), {"to_json": lambda self: {**m, "dataset": dataset, "device": "cpu"}})()

    def fake_classifiers(metrics: list[str], dataset: str, **kw: Any) -> list[dict[str, Any]]:
        return [{"metric": m, "dataset": dataset, "seconds_per_sample_epoch": 1e-5} for m in metrics]

    frame, used = estimate.estimate(specs, None, device=torch.device("cpu"), metrics=["acc_logreg", "fd_domain"],
                                    measure_fn=fake_measure, classifiers_fn=fake_classifiers)  # fmt: skip
    assert [c["metric"] for c in used.classifiers] == ["acc_logreg"]  # one data shape: timed once
    assert all(v > 0 for v in frame["score_s"])
    distinct = {(s.method, estimate.data_shape(s.dataset), cost_key(s.config_json)) for s in specs}
    assert len(calls) == len(distinct) == 1  # the ε values share a config, MNIST has FMNIST's shape: timed once
    assert used.device == "cpu" and len(used.measurements) == len(calls)
    for row, spec in zip(frame.itertuples(), specs, strict=True):
        assert row.train_s == pytest.approx(estimate.work_of(spec)["dp steps"] * 0.25)


def test_a_classifier_that_cannot_be_timed_leaves_the_others_and_is_named() -> None:
    specs = [s for s in _plan("dpdm-tmlr23").specs if s.method == "dpdm"]
    echoed: list[str] = []

    def fake_measure(method: str, dataset: str, cfg: Any, **kw: Any) -> Any:
        m = _measurement(next(s for s in specs if s.method == method and s.dataset == dataset), [0.25], 0.002)
        return type("M", (), {"to_json": lambda self: {**m, "dataset": dataset, "device": "cpu"}})()

    def fake_classifiers(metrics: list[str], dataset: str, **kw: Any) -> list[dict[str, Any]]:
        if "acc_cnn" in metrics:
            raise BenchError("protocol dpdm, cnn: a training step at batch 10 needs about 9.0 GiB")
        return [{"metric": m, "dataset": dataset, "seconds_per_sample_epoch": 1e-5} for m in metrics]

    frame, used = estimate.estimate(specs, None, device=torch.device("cpu"), metrics=["acc_cnn", "acc_logreg"],
                                    measure_fn=fake_measure, classifiers_fn=fake_classifiers,
                                    echo=echoed.append)  # fmt: skip
    assert [c["metric"] for c in used.classifiers] == ["acc_logreg"]
    assert any(e.startswith("warning: cannot time acc_cnn on ") and "9.0 GiB" in e for e in echoed)
    assert all("classifiers not measured: acc_cnn" in status for status in frame["status"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--throughput", "x.json"], "--throughput goes with --estimate"),
        (["--estimate", "--throughput", "missing.json"], "missing.json does not exist"),
        (["--estimate", "--run"], "--estimate runs nothing"),
    ],
)
def test_estimate_options_fail_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    r = bench(*["paper", "dpdm-tmlr23", "--profile", TINY_PROFILE, "--results", str(tmp_path / "r"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1


def test_a_malformed_throughput_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text('{"format": 7}')
    r = bench(*["paper", "dpdm-tmlr23", "--estimate", "--throughput", str(bad), "--profile", TINY_PROFILE])
    assert r.exit_code == 2 and "is not a throughput file" in r.stderr


def test_gpu_check_cpu_mode_writes_the_files_it_promises(tmp_path: Path) -> None:
    """`make gpu-check DEVICE=cpu QUICK=1`'s script: the four files, a throughput row for every method (dpdm in
    both precisions), dpdm's DP/non-private ratio, the grid's results and report, and both estimates."""
    out = tmp_path / "out"
    assert gpucheck.main(["--out", str(out), "--device", "cpu", "--quick", "--tests", str(ROOT / "tests")]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(gpucheck.FILES)
    info = json.loads((out / "summary.json").read_text())
    labels = [r["label"] for r in info["throughput"]]
    assert labels == ["dpsad (ddpm)", "dpsad (edm)", "dpsad-e2e", "dpdm fp32", "dpdm bf16", "dpgan", "pategan",
                      "dpmerf", "dphp", "ddpm", "ddpm with dpdm's network", "dpntk", "dpkernel", "gswgan", "gpate",
                      "datalens"]  # fmt: skip
    for r in info["throughput"]:
        assert not r["error"], r
        assert r["stages"] and all(st["seconds_per_unit"] > 0 for st in r["stages"]), r
        assert r["sample_seconds"] > 0
    assert [len(r["stages"]) for r in info["throughput"] if r["method"] == "dpsad"] == [2, 2]  # teacher, student
    assert set(info["dp_ratio"]) == {"dpdm fp32", "dpdm bf16"}
    assert all(v["ratio"] > 0 for v in info["dp_ratio"].values())
    assert info["tests"]["exit"] in (0, 5) and "error" not in info["tests"]["counts"]  # gpu tests skip on a CPU
    assert info["grid"]["exit"] == 0, info["grid"]["tail"]
    assert set(info["estimates"]) == set(gpucheck.PAPERS)
    assert all("CPU-h** for the" in text for text in info["estimates"].values()), info["estimates"]
    throughput = json.loads((out / "throughput.json").read_text())
    assert len(throughput["measurements"]) == len(labels)
    assert [c["metric"] for c in throughput["classifiers"]] == [m for m in METRIC_PROTOCOL if m not in ON_REQUEST]
    assert all(c["seconds_per_sample_epoch"] > 0 for c in throughput["classifiers"])
    import tarfile

    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert {"gpu-tests.log", "throughput.log", "grid.log", "results", "reports"} <= set(names)
    assert any(n.startswith("results/") and n.endswith("metrics.json") for n in names)
    assert not any(n.endswith(".pt") for n in names)
    assert "## Training throughput (the tiny test profile" in (out / "summary.md").read_text()
    assert data.spec_without_files("fmnist").num_train == 60000  # the full mode's shape


def test_gpu_check_reruns_only_the_parts_and_runs_asked(tmp_path: Path, capsys) -> None:
    """A lent machine's second call reruns what failed: --parts picks the parts, --only the throughput rows."""
    out = tmp_path / "out"
    args = ["--out", str(out), "--device", "cpu", "--quick", "--tests", str(ROOT / "tests")]
    assert gpucheck.main([*args, "--parts", "throughput", "--only", "ddpm with,dpmerf"]) == 0
    info = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in info["throughput"]] == ["dpmerf", "ddpm with dpdm's network"]
    assert info["tests"] is None and "grid" not in info and "estimates" not in info
    assert info["skipped"] == [f"{p}: not asked for (--parts)" for p in ("tests", "classifiers", "grid", "estimates")]
    assert len(json.loads((out / "throughput.json").read_text())["measurements"]) == 2
    assert gpucheck.main([*args, "--parts", "throughput,grids"]) == 2
    assert "unknown ['grids']" in capsys.readouterr().out


def test_the_summary_names_the_bundles_commit_where_no_git_is_at_hand(tmp_path: Path, monkeypatch) -> None:
    """A lent machine runs bench from a copy of the tree without .git: the commit `make gpu-bundle` wrote is used."""
    assert gpucheck._commit() not in ("", "unknown")  # this checkout
    (tmp_path / "commit").write_text("abc1234 with uncommitted changes\n")

    def no_git(*args, **kwargs):
        raise OSError("no git")

    monkeypatch.setattr(gpucheck.subprocess, "run", no_git)
    assert gpucheck._commit(tmp_path / "commit") == "abc1234 with uncommitted changes (when the bundle was made)"
    assert gpucheck._commit(tmp_path / "missing") == "unknown"


def test_timing_on_a_cpu_chunks_a_large_physical_batch_and_records_the_config_asked(monkeypatch) -> None:
    """The paper profile's dpdm chunks (512 examples × K = 32 draws) took over 24 GiB and the OS killed the
    estimate: on a CPU the timing runs chunks of ≤ 512 rows (the same step, memory only) and records the config
    it was asked to time."""
    import dataclasses

    from bench import throughput

    seen: list[Any] = []
    real = registry.get("dpdm")

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, cfg: Any, **kw: Any) -> None:
            seen.append(cfg)
            super().__init__(cfg, **kw)

        def fit(self, *a: Any, **kw: Any) -> Any:
            raise throughput.Enough

    monkeypatch.setattr(throughput.registry, "get", lambda name: Spy)
    cfg = dataclasses.replace(real.Config(), noise_multiplicity=32, physical_batch_size=512)
    m = throughput.measure("dpdm", "fmnist", cfg, device=torch.device("cpu"), sample_n=0)
    assert seen[0].physical_batch_size == 512 // 32 and m.config["physical_batch_size"] == 512
