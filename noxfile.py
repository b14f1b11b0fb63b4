"""Developer sessions: tests, lint, typecheck, bench, docs, build, demo.

Every session installs torch==2.13.0 first (a CPU build kept on the machines here);
a bare torch requirement could otherwise pull a multi-GB CUDA build.
"""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import nox

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]

TORCH = "torch==2.13.0"
PLUGINS = sorted(str(p.parent) for p in Path("plugins").glob("*/pyproject.toml"))


def _install_dev(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-r", "requirements-dev.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """Core and plugin tests (the same command CI runs)."""
    _install_dev(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "plugins", "tests", "bench", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install_dev(session)
    session.run("mypy", "src/tensorscope_core", *[f"{p}/src" for p in PLUGINS])


#: bench-only comparison baselines, installed in the bench session and nowhere else
BENCH_BASELINES = ["captum==0.9.0"]  # gradients.tracin vs TracInCP, circuits.integrated_gradients vs Captum's IG
#: hessian.lanczos vs HessianLinearOperator + eigsh; installed with --no-deps, since curvlinops' own requirements
#: would replace the CPU torch with a CUDA build
BENCH_BASELINES_NO_DEPS = ["curvlinops-for-pytorch==3.0.1", "backpack-for-pytorch==1.7.1", "einops==0.8.2",
                           "einconv==0.1.0", "unfoldNd==0.2.3", "linear_operator==0.6.1", "opt-einsum==3.4.0"]
#: the plugins' benchmarks, each its own script (bench/README.md says what each measures)
PLUGIN_BENCHES = ["bench_fisher_stein", "bench_fisher_gram", "bench_hessian_lanczos", "bench_attention_capture",
                  "bench_integrated_gradients", "bench_fiber_bundle", "bench_geometry_streaming", "bench_merging",
                  "bench_core_v2", "bench_ray", "bench_resume", "bench_hessian_product"]
#: plugin benchmarks with one size only (each a few minutes at most), run as they are
SINGLE_SIZE_BENCHES = ["bench_information", "bench_modularity", "bench_signal_propagation", "bench_tracin_path",
                       "bench_null_space", "bench_imp"]


@nox.session
def bench(session: nox.Session) -> None:
    """The core's benchmarks (capture overhead, sharing, declared-vs-measured memory, TracIn vs Captum), then
    every plugin benchmark, each as ratios measured side by side in one run. ``-- --quick`` for a smoke run."""
    _install_dev(session)
    session.install(*BENCH_BASELINES, TORCH)  # naming torch keeps the CPU build
    session.install("--no-deps", *BENCH_BASELINES_NO_DEPS)
    session.run("python", "bench/run.py", *session.posargs)
    quick = ["--quick"] if "--quick" in session.posargs else []
    for script in PLUGIN_BENCHES:
        session.run("python", f"bench/{script}.py", *quick)
    for script in SINGLE_SIZE_BENCHES:
        session.run("python", f"bench/{script}.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate the metric catalogue and the JSON Schemas of results and reports from the code."""
    _install_dev(session)
    session.run("python", "-m", "tensorscope_core.catalogue", "docs/metrics.md")
    session.run("python", "-m", "tensorscope_core.results.export_schema", "docs/result-schema.json")
    session.run("python", "-m", "tensorscope_core.results.export_schema", "--report", "docs/report-schema.json")


@nox.session
def build(session: nox.Session) -> None:
    """Wheels of the core and every plugin into dist/, then a clean install from that wheelhouse."""
    session.install("build")
    shutil.rmtree("dist", ignore_errors=True)
    for folder in [".", *PLUGINS]:
        session.run("python", "-m", "build", "--wheel", "--outdir", "dist", folder)
    session.install(TORCH)
    session.install("--find-links", "dist", "tensorscope[all]")
    session.run("python", "-c", "import tensorscope_core, tensorscope_basic; from importlib.metadata import "
                "version; assert version('tensorscope').startswith('2.'), version('tensorscope')")
    session.run("tensorscope", "plugins")
    session.log("wheels: " + ", ".join(Path(p).name for p in glob.glob("dist/*.whl")))


@nox.session
def demo(session: nox.Session) -> None:
    _install_dev(session)
    session.run("tensorscope", "demo", "--out", "demo-out")
