"""Evolution strategies: maximisation, exact resume from plain-data state, seeding, input errors."""

import io
import json

import numpy as np
import pytest

from essa import EssaError, strategies
from essa.strategies import DEFAULT_SIGMA0, STRATEGIES, centred_ranks, default_popsize, make_strategy, strategy_from_state

ALL = sorted(STRATEGIES)
DIM, POP = 20, 16
TARGET = 0.5 * np.random.default_rng(123).standard_normal(DIM)


def concave(X):
    """f(x) = -||x - x*||², maximum 0 at x*."""
    return -np.sum((np.atleast_2d(X) - TARGET) ** 2, axis=-1)


def run(es, generations, f=concave):
    asks = []
    for _ in range(generations):
        X = es.ask()
        asks.append(X)
        es.tell(X, f(X))
    return asks


def savez_roundtrip(meta, arrays):
    """What the trainer does: meta through JSON, arrays through np.savez / np.load(allow_pickle=False)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        loaded = {k: npz[k] for k in npz.files}
    return json.loads(json.dumps(meta, allow_nan=False)), loaded


@pytest.mark.parametrize("name", ALL)
def test_maximises_a_concave_function(name):
    es = make_strategy(name, DIM, POP, sigma0=0.1, seed=0)
    start = concave(es.mean)[0]
    X = es.ask()
    first_best = concave(X).max()
    es.tell(X, concave(X))
    asks = run(es, 99)
    assert es.generation == 100
    assert concave(es.mean)[0] > 0.05 * start          # squared distance to x* cut by > 95 %
    assert concave(asks[-1]).max() > 0.05 * first_best  # and the population follows
    assert np.corrcoef(es.mean, TARGET)[0, 1] > 0.95   # it went towards x*, not merely somewhere


def test_nes_with_adam_maximises():
    es = make_strategy("nes", DIM, POP, sigma0=0.1, seed=0, optimizer="adam")
    start = concave(es.mean)[0]
    run(es, 100)
    assert concave(es.mean)[0] > 0.05 * start


@pytest.mark.parametrize("name", ALL)
def test_ask_shapes_and_properties(name):
    es = make_strategy(name, 5, 6, sigma0=0.3, seed=1)
    X = es.ask()
    assert X.shape == (6, 5) and X.dtype == np.float64
    assert np.array_equal(es.mean, np.zeros(5)) and es.sigma == pytest.approx(0.3) and es.generation == 0
    m = es.mean
    m += 1  # mean is a copy
    assert np.array_equal(es.mean, np.zeros(5))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("between_ask_and_tell", [False, True])
def test_state_round_trip_continues_bit_identically(name, between_ask_and_tell):
    es = make_strategy(name, DIM, POP, sigma0=0.1, seed=7)
    run(es, 4)
    pending = es.ask() if between_ask_and_tell else None
    meta, arrays = savez_roundtrip(*es.state_dict())

    fresh = make_strategy(name, DIM, POP, sigma0=0.1, seed=7)
    fresh.load_state_dict(meta, arrays)
    rebuilt = strategy_from_state(meta, arrays)
    copies = [fresh, rebuilt]
    if pending is not None:
        for c in [es] + copies:
            c.tell(pending, concave(pending))
    for c in copies:
        assert c.generation == es.generation and c.sigma == es.sigma and np.array_equal(c.mean, es.mean)
    expected = run(es, 4)
    for c in copies:
        got = run(c, 4)
        assert all(np.array_equal(a, b) for a, b in zip(expected, got))
        assert np.array_equal(c.mean, es.mean) and c.sigma == es.sigma


@pytest.mark.parametrize("name", ALL)
def test_state_is_plain_data(name):
    es = make_strategy(name, DIM, POP, sigma0=0.1, seed=3)
    run(es, 2)
    meta, arrays = es.state_dict()
    json.dumps(meta, allow_nan=False)
    assert meta["strategy"] == name and meta["dim"] == DIM and meta["popsize"] == POP
    for key, a in arrays.items():
        assert isinstance(a, np.ndarray) and a.dtype.kind in "biuf", key
    meta2, arrays2 = savez_roundtrip(meta, arrays)
    assert meta2 == meta
    assert set(arrays2) == set(arrays) and all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)


def test_full_cma_checkpoint_leaves_out_unused_lr_adapt_matrix():
    es = make_strategy("cma", DIM, POP, seed=0)
    _, arrays = es.state_dict()
    assert "es._C" in arrays and "es._ESigma" not in arrays


@pytest.mark.parametrize("name", ALL)
def test_seeding(name):
    a = make_strategy(name, DIM, POP, sigma0=0.1, seed=11)
    b = make_strategy(name, DIM, POP, sigma0=0.1, seed=11)
    c = make_strategy(name, DIM, POP, sigma0=0.1, seed=12)
    for x, y, z in zip(run(a, 3), run(b, 3), run(c, 3)):
        assert np.array_equal(x, y)
        assert not np.allclose(x, z)


def test_cma_ask_matches_cmaes_own_sampler():
    """Our one-matmul-per-generation ask() draws what cmaes.CMA.ask() would, from the same RNG stream."""
    es = make_strategy("cma", 6, 8, sigma0=0.2, seed=5)
    run(es, 3, f=lambda X: -np.sum((X - 1.0) ** 2, axis=1))
    twin = strategy_from_state(*es.state_dict())
    ours = es.ask()
    native = np.stack([twin._es.ask() for _ in range(8)])
    np.testing.assert_allclose(ours, native, rtol=0, atol=1e-13)


def test_nes_mirrored_sampling():
    es = make_strategy("nes", 4, 6, sigma0=0.5, seed=0)
    X = es.ask()
    np.testing.assert_allclose(X[:3], -X[3:])


def test_centred_ranks():
    np.testing.assert_allclose(centred_ranks([3.0, 1.0, 2.0]), [0.5, -0.5, 0.0])
    # ties share their average rank: accuracy-style rewards are full of ties
    np.testing.assert_allclose(centred_ranks([1.0, 1.0, 0.0, 2.0]), [0.0, 0.0, -0.5, 0.5])
    np.testing.assert_allclose(centred_ranks([5.0, 5.0]), [0.0, 0.0])


def test_auto_picks_by_dimension(monkeypatch):
    monkeypatch.setattr(strategies, "FULL_CMA_MAX_DIM", 10)
    assert make_strategy("auto", 10, 8).name == "cma"
    assert make_strategy("auto", 11, 8).name == "sep_cma"
    monkeypatch.undo()
    assert strategies.FULL_CMA_MAX_DIM >= 1920  # the real threshold keeps SmolLM2's genome on full CMA


def test_defaults():
    assert 0 < DEFAULT_SIGMA0 < 0.1
    assert default_popsize(1920) % 2 == 0 and default_popsize(1920) >= 26
    es = make_strategy("nes", 4, 4)
    assert es.opts["lr"] == pytest.approx(strategies.NES_LR_FACTOR * DEFAULT_SIGMA0 ** 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="ga"), "unknown strategy 'ga'; choose one of: auto, cma, sep_cma, nes"),
    (dict(popsize=1), "popsize must be an integer >= 2"),
    (dict(popsize=3), "popsize must be an integer >= 4"),             # cma
    (dict(name="nes", popsize=7), "popsize must be even"),
    (dict(dim=0), "dim must be an integer >= 1"),
    (dict(name="sep_cma", dim=1), "needs dim >= 2"),
    (dict(sigma0=0.0), "sigma0 must be a positive finite number"),
    (dict(sigma0=float("nan")), "sigma0 must be a positive finite number"),
    (dict(seed=-1), "seed must be an integer in"),
    (dict(lr=0.1), "strategy 'cma' has no option"),
    (dict(name="nes", optimizer="rmsprop"), "unknown NES optimizer"),
    (dict(name="nes", lr=-1.0), "NES option lr=-1.0 is out of range"),
])
def test_bad_construction_raises_essa_error(kwargs, match):
    args = dict(name="cma", dim=4, popsize=8, sigma0=0.1, seed=0)
    args.update(kwargs)
    name, dim, popsize = args.pop("name"), args.pop("dim"), args.pop("popsize")
    with pytest.raises(EssaError, match=match):
        make_strategy(name, dim, popsize, **args)


@pytest.mark.parametrize("name", ALL)
def test_bad_tell_raises_essa_error(name):
    es = make_strategy(name, 4, 8, seed=0)
    X = es.ask()
    with pytest.raises(EssaError, match="solutions of shape"):
        es.tell(X[:4], np.zeros(4))
    with pytest.raises(EssaError, match="fitness of shape"):
        es.tell(X, np.zeros(7))
    with pytest.raises(EssaError, match="NaN or infinite"):
        es.tell(X, np.array([0, 1, 2, np.nan, 4, 5, 6, 7.0]))
    es.tell(X, np.arange(8.0))  # still usable afterwards
    assert es.generation == 1


@pytest.mark.parametrize("name", ALL)
def test_loading_mismatched_state_raises_essa_error(name):
    meta, arrays = make_strategy(name, 4, 8, seed=0).state_dict()
    with pytest.raises(EssaError, match="checkpoint was written with dim=4"):
        make_strategy(name, 5, 8, seed=0).load_state_dict(meta, arrays)
    other = "nes" if name != "nes" else "cma"
    with pytest.raises(EssaError, match=f"strategy='{name}'"):
        make_strategy(other, 4, 8, seed=0).load_state_dict(meta, arrays)
    with pytest.raises(EssaError, match="format"):
        make_strategy(name, 4, 8, seed=0).load_state_dict({**meta, "format": 99}, arrays)


def test_cmaes_version_drift_is_detected():
    meta, arrays = make_strategy("cma", 4, 8, seed=0).state_dict()
    meta["state"]["attrs"]["_new_attribute"] = 1.0
    with pytest.raises(EssaError, match="install cmaes=="):
        make_strategy("cma", 4, 8, seed=0).load_state_dict(meta, arrays)


def test_uncheckpointable_cmaes_attribute_fails_loudly():
    es = make_strategy("sep_cma", 4, 8, seed=0)
    es._es._callback = lambda: None  # an attribute a future cmaes might add
    with pytest.raises(EssaError, match="cannot checkpoint"):
        es.state_dict()
