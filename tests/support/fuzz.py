"""Coverage-guided fuzzing of the gateway's parsers (the targets and their invariants: ``support.fuzz_targets``).

    python -m tests.support.fuzz --seconds 600               # the release pass: every target, 10 minutes each
    python -m tests.support.fuzz --target model --seconds 60  # one target
    python -m tests.support.fuzz --runs 3000 --seed 1         # a fixed, repeatable pass (what the test suite runs)

Each target runs in its own process under atheris (libFuzzer for Python):
the gateway's modules are instrumented for coverage, libFuzzer starts from
the committed seed corpus (``tests/fuzz_corpus/<target>/``, and for
``policy`` the shipped policies), and keeps the inputs that reach new code
in a scratch corpus (``--corpus-dir``, default ``.fuzz/corpus/<target>``),
so a later run goes on from there. An input that breaks an invariant is
written to ``--artifacts`` (default ``.fuzz/artifacts``) as ``crash-<sha1>``;
add it to the seed corpus once fixed, so the test suite replays it for ever.
Without atheris (a platform it has no wheel for) the same targets run under
Hypothesis, derandomized, on ``--runs`` random inputs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
SEEDS = TESTS / "fuzz_corpus"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # support.fuzz_targets and support.json_oracles, as pytest imports them


def seed_inputs(name: str) -> list[bytes]:
    """The committed seeds of one target (and the shipped policies, for ``policy``)."""
    files = sorted((SEEDS / name).glob("*"))
    if name == "policy":
        files += sorted((ROOT / "policies").glob("*.yaml")) + sorted((ROOT / "policies" / "examples").glob("*.yaml"))
    return [f.read_bytes() for f in files if f.is_file()]


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_one(name: str, runs: int | None, seconds: int | None, seed: int, corpus: Path, artifacts: Path) -> int:
    """Fuzz one target in a child process; its exit status (0: no invariant broke)."""
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seed_inputs(name)):  # libFuzzer reads every corpus directory given
        (corpus / f"seed-{i}").write_bytes(data)
    args = [sys.executable, "-m", "tests.support.fuzz", "--child", name, "--seed", str(seed)]
    args += ["--runs", str(runs)] if runs is not None else ["--seconds", str(seconds)]
    args += ["--corpus-dir", str(corpus), "--artifacts", str(artifacts)]
    return subprocess.run(args, cwd=ROOT, check=False).returncode


def _child(name: str, runs: int | None, seconds: int | None, seed: int, corpus: Path, artifacts: Path) -> None:
    """In the child: fuzz ``name`` until ``runs`` inputs or ``seconds`` have gone; never returns."""
    if not _have_atheris():
        _hypothesis(name, runs or 10_000)
        sys.exit(0)
    import atheris

    with atheris.instrument_imports(include=["gateway"]):
        from support import fuzz_targets
    target, _, max_len = fuzz_targets.TARGETS[name]
    limit = f"-runs={runs}" if runs is not None else f"-max_total_time={seconds}"
    argv = [sys.argv[0], limit, f"-seed={seed}", f"-max_len={max_len}", f"-artifact_prefix={artifacts}/"]
    words = SEEDS / f"{name}.dict"  # libFuzzer's dictionary: tokens worth splicing in
    argv += [f"-dict={words}"] if words.exists() else []
    argv += ["-print_final_stats=1", "-rss_limit_mb=2048", "-timeout=10", str(corpus)]
    atheris.Setup(argv, target)
    atheris.Fuzz()


def _hypothesis(name: str, runs: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from support import fuzz_targets

    target, _, max_len = fuzz_targets.TARGETS[name]
    seeds = seed_inputs(name)
    inputs = st.one_of(st.binary(max_size=max_len), st.sampled_from(seeds)) if seeds else st.binary(max_size=max_len)
    check = settings(
        max_examples=runs, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )(given(inputs)(target))
    check()


NAMES = ("forwarded", "model", "path", "policy", "xff")  # fuzz_targets.TARGETS, which a child imports instrumented


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", choices=NAMES, help="default: every target")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--seconds", type=int, help="how long each target runs (default 60)")
    limit.add_argument("--runs", type=int, help="how many inputs each target gets, instead of a time")
    p.add_argument("--seed", type=int, default=0, help="libFuzzer's seed (0: a new one each run)")
    p.add_argument("--corpus-dir", type=Path, default=ROOT / ".fuzz" / "corpus")
    p.add_argument("--artifacts", type=Path, default=ROOT / ".fuzz" / "artifacts")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None or args.runs is not None else 60
    if args.child:
        _child(args.child, args.runs, seconds, args.seed, args.corpus_dir, args.artifacts)
    failed = []
    for name in args.target or NAMES:
        print(f"fuzz: {name}", flush=True)
        corpus = args.corpus_dir / name
        if run_one(name, args.runs, seconds, args.seed, corpus, args.artifacts) != 0:
            failed.append(name)
    if failed:
        print(f"fuzz: invariants broken in {', '.join(failed)}; inputs in {args.artifacts}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
