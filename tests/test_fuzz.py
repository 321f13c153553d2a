"""The wire fuzzer: its cases are seeded and cover every mutation, and 10,000 of them against a real
`edgeexit serve` and a real `edgeexit agent` break nothing (edgeexit/testbed/fuzz.py)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import zstandard

from edgeexit.bundle import Bundle
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.testbed.fuzz import fuzz, fuzz_targets, rss_kb
from edgeexit.testbed.fuzz_cases import MUTATIONS, Bombs, base_requests, make_case

SEED = 13
BOMB_MB = 12  # above the 8 MiB --max-message-mb the fuzz targets run with


@pytest.fixture(scope="module")
def cases_env(tiny_bundle):
    m = Bundle.load(tiny_bundle, verify=False).manifest
    models = [m.name, *(f"{m.name}@{sp.index}" for sp in m.split_points)]
    return base_requests(m), Bombs(BOMB_MB), models


def test_cases_are_a_function_of_seed_and_index(cases_env):
    bases, bombs, models = cases_env
    a = [make_case(SEED, i, bases, bombs, models) for i in range(300)]
    b = [make_case(SEED, i, bases, bombs, models) for i in reversed(range(300))][::-1]
    assert [c.payload for c in a] == [c.payload for c in b]
    assert [c.payload for c in a] != [make_case(SEED + 1, i, bases, bombs, models).payload for i in range(300)]


def test_cases_cover_every_mutation_and_both_targets(cases_env):
    bases, bombs, models = cases_env
    cases = [make_case(SEED, i, bases, bombs, models) for i in range(3000)]
    seen = Counter(m for c in cases for m in c.label.split("+"))
    for mutation, _ in MUTATIONS:
        assert seen[mutation.__name__[2:]] >= 20, mutation.__name__
    for what in ("bitflip", "truncate", "insert", "varint", "random"):
        assert seen[f"bytes-{what}"] >= 20, what
    assert {c.target for c in cases} == {"serve", "agent"}
    assert all(c.payload == next(b.request for b in bases if b.request == c.payload) for c in cases if c.valid)


def test_base_requests_are_valid_and_the_bombs_exceed_the_limit(cases_env):
    bases, bombs, _ = cases_env
    for b in bases:
        req = pb.ModelInferRequest.FromString(b.request)
        assert len(req.inputs) == len(req.raw_input_contents) == 1
        assert list(req.inputs[0].shape)[1:] == list(b.inner_shape)
    assert len(bombs.undeclared) < 4096 < bombs.nbytes
    assert len(zstandard.ZstdDecompressor().decompress(bombs.declared)) == BOMB_MB << 20


def test_protobuf_mutations_reach_the_hostile_values(cases_env):
    """Huge and negative dims, NaN doubles and bools on edgeexit.* parameters all appear in a few thousand."""
    bases, bombs, models = cases_env
    dims, doubles, bools = set(), [], 0
    for i in range(3000):
        c = make_case(SEED, i, bases, bombs, models)
        try:
            req = pb.ModelInferRequest.FromString(c.payload)
        except Exception:  # noqa: BLE001 - byte-level cases may not parse: that is their point
            continue
        for t in req.inputs:
            dims.update(t.shape)
            for maps in (t.parameters, req.parameters):
                for k, p in maps.items():
                    if k.startswith("edgeexit."):
                        kind = p.WhichOneof("parameter_choice")
                        doubles += [p.double_param] if kind == "double_param" else []
                        bools += kind == "bool_param"
    assert 2**62 in dims and 2**63 - 1 in dims and 0 in dims and min(dims) < 0
    assert any(math.isnan(d) for d in doubles) and any(math.isinf(d) for d in doubles) and bools > 0


def test_rss_of_a_missing_process_is_zero():
    assert rss_kb(2**22 + 12345) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_10000_mutated_requests_break_neither_serve_nor_agent(tiny_bundle, tmp_path):
    """>= 10,000 mutated OIP requests, 4 client threads, against real processes; everything checked at once so
    one run says every rule that broke (the report lists the cases: rebuild one with make_case(SEED, index))."""
    from edgeexit.testbed.fuzz import answer_problems

    with fuzz_targets(tiny_bundle, tmp_path, max_message_mb=8) as targets:
        report = fuzz(tiny_bundle, targets, requests=10_000, seed=SEED, threads=4, warmup=1000,
                      time_limit_s=150, bomb_mb=BOMB_MB)
        broken = []
        if report.requests < 10_000:
            broken.append(f"only {report.requests} requests within the time limit")
        if report.internal_errors:
            broken.append(f"{report.internal_errors} INTERNAL/UNKNOWN answers")
        if report.ok_nonfinite:
            broken.append(f"{report.ok_nonfinite} OK answers with NaN/inf")
        if report.valid_failed:
            broken.append(f"{report.valid_failed} valid requests were not answered OK during the fuzz")
        dead = [name for name, p in targets.items() if not p.alive()]
        if dead:
            broken.append(f"{dead} died")
        grown = {t: round((end - start) / 1024, 1) for t, (start, end) in report.rss_kb.items()
                 if end - start > 20 * 1024}
        if grown:
            broken.append(f"RSS grew by more than 20 MB after the warm-up: {grown} MB")
        broken += answer_problems(tiny_bundle, targets)
        logs = {name: p.log() for name, p in targets.items()}
    tracebacks = [name for name, text in logs.items() if "Traceback" in text]
    if tracebacks:
        broken.append(f"tracebacks in the log of {tracebacks}")
    assert not broken, "; ".join(broken) + f"\ncodes: {report.summary()['codes']}\n" + report.describe()
