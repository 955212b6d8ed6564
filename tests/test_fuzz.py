"""Bounded mutation fuzzing (tests/fuzzing.py; long runs: benchmarks/fuzz.py): every mutant of every
sample model is either refused with a WidenError or written and independently validated. Never a
traceback, a hang, a crash, or an invalid model written."""
import os

import pytest

import fuzzing

SEED = 20240611
PER_KIND = 11  # mutants per mutation kind; about 200 in all, ~50 s on 2 cores
# Known tracebacks, by mutation kind: [(file the exception comes from, exception type, reason)]. A
# kind's test xfails only when every bug it found matches a known signature; anything else fails.
# (Empty: the LayerNorm-swap and 2-D Reshape-shape tracebacks found by this harness are fixed.)
KNOWN: dict = {}
XFAIL = {k: "; ".join(v[2] for v in sigs) for k, sigs in KNOWN.items()}


@pytest.fixture(scope="module")
def results():
    return fuzzing.run(PER_KIND * len(fuzzing.MUTATIONS), seed=SEED, workers=min(2, os.cpu_count() or 1), limit=90)


def _describe(bad):
    return "\n".join(f"{r['outcome']}: {r['sample']} {r['kind']} seed={r['seed']} factor={r['factor']}: {r.get('detail')} -> "
                     f"{r.get('message')} {r.get('where', '')}" for r in bad)


def _known(r):
    return r["outcome"] == "traceback" and any(
        r.get("origin") == origin and r["message"].startswith(exc + ":") for origin, exc, _ in KNOWN.get(r["kind"], ()))


@pytest.mark.parametrize("kind", list(fuzzing.MUTATIONS))
def test_mutants_are_refused_or_valid(results, kind):
    mine = [r for r in results if r["kind"] == kind]
    assert mine and sum(r["outcome"] != "skipped" for r in mine) >= PER_KIND // 2, f"{kind}: mutation rarely applies"
    bad = [r for r in mine if r["outcome"] not in ("refused", "valid", "skipped")]
    unknown = [r for r in bad if not _known(r)]
    assert not unknown, _describe(unknown)
    if bad:
        pytest.xfail(f"{XFAIL[kind]}: {_describe(bad)}")


def test_refusals_are_one_line(results):
    for r in results:
        if r["outcome"] == "refused":
            assert r["message"].strip() and "\n" not in r["message"] and "Traceback" not in r["message"]


def test_structure_preserving_mutants_still_widen(results):
    """Reordering nodes, dropping names, extra Identity nodes, other weights: still widened."""
    for kind in fuzzing.PRESERVING:
        assert any(r["kind"] == kind and r["outcome"] == "valid" for r in results), kind


def test_counts(results):
    s = fuzzing.summarize(results)
    assert s["refused"] > 0 and s["valid"] > 0
    assert s["traceback"] + s["invalid_written"] + s["hang"] + s["crash"] == sum(1 for r in results if _known(r))
