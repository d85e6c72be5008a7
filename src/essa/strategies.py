"""Evolution strategies behind one small ask/tell protocol.

Every strategy searches over a flat vector of **offsets** to the SFT singular values (see
``essa.genome``), starting from the zero vector (the SFT adapter itself), and **maximises** fitness::

    es = make_strategy("cma", dim, popsize=32, sigma0=DEFAULT_SIGMA0, seed=0)
    for _ in range(generations):
        X = es.ask()                      # [popsize, dim] float64 candidate offsets
        es.tell(X, fitness(X))            # [popsize], higher is better, same order as X
    best_guess = es.mean                  # what to validate and export

Strategies (``STRATEGIES``):

* ``"cma"``: full-covariance CMA-ES (``cmaes.CMA``), the optimiser of the ESSA paper.
* ``"sep_cma"``: separable (diagonal-covariance) CMA-ES (``cmaes.SepCMA``), for large dimensions.
* ``"nes"``: plain OpenAI-ES (Salimans et al. 2017): mirrored sampling, centred-rank fitness
  shaping, SGD (or Adam) on the mean, fixed (optionally decayed) sigma.
* ``"auto"`` (accepted by ``make_strategy`` only): ``"cma"`` up to ``FULL_CMA_MAX_DIM``, else
  ``"sep_cma"``.

State is plain data, in the spirit of evosax: ``state_dict()`` returns ``(meta, arrays)`` where
``meta`` is JSON-serialisable and ``arrays`` maps names to ordinary numeric numpy arrays (suitable for
``np.savez`` / ``np.load(allow_pickle=False)``). It captures everything, RNG included, so that a
restored strategy continues bit-identically. ``strategy_from_state(meta, arrays)`` rebuilds one.

Choice of sigma0. The paper does not state its initial step size. Offsets are *absolute* and are
added to the singular values of the LoRA factors. With PEFT's default init, A has singular values
≈ 0.58 (rows of kaiming-uniform entries with variance 1/(3·in)); B starts at zero and after SFT
typically has singular values of a few 0.01 to ~0.2. ``DEFAULT_SIGMA0 = 0.01`` therefore perturbs each
component of B·A by roughly 2 % (through s_A) to 5-50 % (through s_B): enough for candidates to
produce different generations (otherwise rank-based ES sees only ties), small enough to stay near
the SFT adapter, which is the whole point of starting from it. CMA-ES adapts sigma from there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from essa import EssaError

#: Initial step size (absolute offset on singular values); see the module docstring.
DEFAULT_SIGMA0 = 0.01

#: Largest dimension for which "auto" picks full-covariance CMA-ES. Full CMA keeps dim x dim
#: matrices (C, and its eigenbasis B: 2 x 8 dim^2 bytes, 59 MB at dim 1920), runs an O(dim^3)
#: eigendecomposition every generation, and cmaes' tell() briefly materialises popsize x dim x dim
#: outer products (8 * popsize * dim^2 bytes: ~0.9 GB at dim 1920, popsize 32). 2048 covers ESSA's
#: SmolLM2 genome (1920); beyond that the separable variant (O(dim) per sample) is the sane default.
FULL_CMA_MAX_DIM = 2048

#: NES: default SGD learning rate is NES_LR_FACTOR * sigma0^2. With centred ranks (sum |w| ≈ n/4)
#: the step lr * grad = lr/sigma^2 * sigma * sum(w_i eps_i)/n equals sigma * sum(w_i eps_i)/sum|w_i|,
#: a rank-weighted mean of the sampled directions: it moves the mean ≈ 1.13 sigma per generation
#: along a perfectly ranked direction (2/sqrt(pi)), like CMA-ES' weighted recombination (c_m = 1).
NES_LR_FACTOR = 4.0
#: NES with optimizer="adam": default learning rate is NES_ADAM_LR_FACTOR * sigma0 (Adam's step per
#: coordinate is about lr, independent of the gradient's scale).
NES_ADAM_LR_FACTOR = 0.1

#: Version of the state_dict layout.
STATE_FORMAT = 1

# cmaes.CMA attributes used only with lr_adapt=True (which we never enable); _ESigma is dim^2
# floats, so they are left out of checkpoints and kept at their constructor values on load.
_CMA_LR_ADAPT_ARRAYS = ("_Emean", "_ESigma")


def default_popsize(dim: int) -> int:
    """CMA-ES' default population size 4 + ⌊3 ln dim⌋, rounded up to even (so "nes" accepts it)."""
    n = 4 + math.floor(3 * math.log(max(dim, 1)))
    return n + n % 2


class Strategy:
    """Common ask/tell plumbing; subclasses implement ask, _update, _state and _load."""

    name = ""
    min_popsize = 2
    valid_opts: tuple[str, ...] = ()

    def __init__(self, dim: int, popsize: int, sigma0: float, seed: int, **opts):
        _check_int("dim", dim, 1, "the genome dimension (number of trainable singular values)")
        _check_int("popsize", popsize, self.min_popsize, f"a population of at least {self.min_popsize} "
                   f"for strategy {self.name!r}")
        _check_int("seed", seed, 0, "a seed in [0, 2**32)", upper=2**32 - 1)
        if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not (
                math.isfinite(sigma0) and sigma0 > 0):
            raise EssaError(f"sigma0 must be a positive finite number, got {sigma0!r}; "
                            f"try the default {DEFAULT_SIGMA0}")
        unknown = sorted(set(opts) - set(self.valid_opts))
        if unknown:
            raise EssaError(f"strategy {self.name!r} has no option(s) {', '.join(unknown)}; valid options: "
                            f"{', '.join(self.valid_opts) or 'none'}")
        self.dim, self.popsize, self.sigma0, self.seed = int(dim), int(popsize), float(sigma0), int(seed)
        self.opts: dict = {}  # resolved options (JSON-serialisable), filled by subclasses

    # --- the protocol -------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        """The population of this generation: [popsize, dim] float64 candidate offsets."""
        raise NotImplementedError

    def tell(self, solutions: np.ndarray, fitness: np.ndarray) -> None:
        """Update from the evaluated population (fitness: higher is better, in ask() order)."""
        solutions = np.asarray(solutions, dtype=np.float64)
        fitness = np.asarray(fitness, dtype=np.float64)
        if solutions.shape != (self.popsize, self.dim):
            raise EssaError(f"tell() got solutions of shape {solutions.shape}, expected "
                            f"{(self.popsize, self.dim)}; pass back exactly what ask() returned")
        if fitness.shape != (self.popsize,):
            raise EssaError(f"tell() got fitness of shape {fitness.shape}, expected ({self.popsize},); "
                            f"pass one fitness value per candidate, in ask() order")
        if not np.all(np.isfinite(fitness)):
            raise EssaError("tell() got a NaN or infinite fitness; make the reward finite "
                            "(e.g. score a failed candidate with the lowest possible reward)")
        self._update(solutions, fitness)

    @property
    def mean(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def sigma(self) -> float:
        raise NotImplementedError

    @property
    def generation(self) -> int:
        raise NotImplementedError

    # --- state ----------------------------------------------------------------------------------
    def _header(self) -> dict:
        return {"format": STATE_FORMAT, "strategy": self.name, "dim": self.dim, "popsize": self.popsize,
                "sigma0": self.sigma0, "seed": self.seed, "opts": dict(self.opts)}

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-serialisable meta, named numeric arrays): everything needed to continue exactly."""
        state, arrays = self._state()
        return {**self._header(), "state": state}, arrays

    def load_state_dict(self, meta: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore a state_dict() (also after a JSON / np.savez round trip) into this strategy."""
        if meta.get("format") != STATE_FORMAT:
            raise EssaError(f"strategy state has format {meta.get('format')!r}, this essa reads format "
                            f"{STATE_FORMAT}; resume with the essa version that wrote the checkpoint")
        mine = self._header()
        for key in ("strategy", "dim", "popsize", "opts"):
            if meta.get(key) != mine[key]:
                raise EssaError(f"checkpoint was written with {key}={meta.get(key)!r} but this strategy has "
                                f"{key}={mine[key]!r}; resume with the checkpoint's settings "
                                f"(or build it with strategy_from_state)")
        self._load(meta["state"], arrays)
        self.sigma0, self.seed = float(meta["sigma0"]), int(meta["seed"])

    def _update(self, solutions: np.ndarray, fitness: np.ndarray) -> None:
        raise NotImplementedError

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        raise NotImplementedError

    def _load(self, state: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError


# --- CMA-ES (via the cmaes library) ----------------------------------------------------------------

class _CmaesStrategy(Strategy):
    """Wraps a cmaes optimiser; cmaes minimises, so fitness is negated on tell()."""

    min_popsize = 4  # below 4, cmaes' rank-mu learning rate is 0 and its weights divide by zero

    def __init__(self, dim, popsize, sigma0, seed, **opts):
        super().__init__(dim, popsize, sigma0, seed, **opts)
        self.opts_in = dict(opts)
        self._es = self._make()

    def _make(self):
        raise NotImplementedError

    def ask(self) -> np.ndarray:
        return np.stack([self._es.ask() for _ in range(self.popsize)])

    def _update(self, solutions, fitness):
        self._es.tell([(x, -float(f)) for x, f in zip(solutions, fitness)])

    @property
    def mean(self) -> np.ndarray:
        return np.array(self._es.mean, dtype=np.float64)  # a copy: cmaes updates its mean in place

    @property
    def sigma(self) -> float:
        return float(self._es._sigma)  # cmaes 0.11-0.13 exposes no public sigma; the checkpoint walk below is private too

    @property
    def generation(self) -> int:
        return int(self._es.generation)

    def _state(self):
        """Walk the cmaes object's __dict__: arrays -> arrays, scalars -> meta, RandomState split."""
        import cmaes

        attrs, np_scalars, arrays = {}, {}, {}
        rng = None
        for key, value in self._es.__dict__.items():
            if key == "_rng":
                if not isinstance(value, np.random.RandomState):
                    raise EssaError(f"cmaes {cmaes.__version__} keeps an RNG of type {type(value).__name__}; "
                                    f"essa can checkpoint only np.random.RandomState: install cmaes 0.11-0.13")
                bitgen, keys, pos, has_gauss, cached = value.get_state()
                rng = {"bit_generator": bitgen, "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}
                arrays["rng.keys"] = np.array(keys)
            elif key in _CMA_LR_ADAPT_ARRAYS and not getattr(self._es, "_lr_adapt", False):
                continue
            elif isinstance(value, np.ndarray):
                if value.dtype == object:
                    raise EssaError(f"cmaes attribute {key} is an object array; essa cannot checkpoint it "
                                    f"without pickle: install cmaes 0.11-0.13")
                arrays["es." + key] = value.copy()
            elif isinstance(value, np.generic):  # before float: np.float64 is a float subclass
                attrs[key] = value.item()
                np_scalars[key] = value.dtype.str
            elif value is None or type(value) in (bool, int, float, str):
                attrs[key] = value
            else:
                raise EssaError(f"cmaes attribute {key} has type {type(value).__name__}, which essa cannot "
                                f"checkpoint; install cmaes 0.11-0.13")
        return {"cmaes_version": cmaes.__version__, "attrs": attrs, "np_scalars": np_scalars,
                "rng": rng}, arrays

    def _load(self, state, arrays):
        import cmaes

        saved = set(state["attrs"]) | {k[3:] for k in arrays if k.startswith("es.")} | {"_rng"}
        expected = set(self._es.__dict__)
        if not getattr(self._es, "_lr_adapt", False):
            expected -= set(_CMA_LR_ADAPT_ARRAYS)
        if saved != expected:
            raise EssaError(f"checkpoint holds the state of cmaes {state.get('cmaes_version')}, which does not "
                            f"match the installed cmaes {cmaes.__version__} (attributes differ: "
                            f"{sorted(saved ^ expected)}); install cmaes=={state.get('cmaes_version')}")
        for key, value in state["attrs"].items():
            if key in state["np_scalars"]:
                value = np.dtype(state["np_scalars"][key]).type(value)
            setattr(self._es, key, value)
        for key in arrays:
            if key.startswith("es."):
                setattr(self._es, key[3:], np.array(arrays[key], copy=True))
        r = state["rng"]
        self._es._rng.set_state((r["bit_generator"], np.array(arrays["rng.keys"], dtype=np.uint32), r["pos"],
                                 r["has_gauss"], r["cached_gaussian"]))


class CMAStrategy(_CmaesStrategy):
    """Full-covariance CMA-ES (cmaes.CMA) from mean 0, unbounded."""

    name = "cma"
    valid_opts = ("lr_adapt",)

    def __init__(self, dim, popsize, sigma0, seed, **opts):
        """Option ``lr_adapt`` (bool): cmaes' learning-rate adaptation (LRA-CMA-ES, Nomura et al. 2023)."""
        if not isinstance(opts.get("lr_adapt", False), bool):
            raise EssaError(f"cma option lr_adapt must be true or false, got {opts['lr_adapt']!r}")
        super().__init__(dim, popsize, sigma0, seed, **opts)
        self.opts = {"lr_adapt": True} if opts.get("lr_adapt") else {}

    def _make(self):
        import cmaes
        return cmaes.CMA(mean=np.zeros(self.dim), sigma=self.sigma0, bounds=None,
                         population_size=self.popsize, seed=self.seed, lr_adapt=bool(self.opts_in.get("lr_adapt")))

    def ask(self) -> np.ndarray:
        # Same distribution and the same random stream as calling cmaes.CMA.ask() popsize times,
        # but cmaes rebuilds B·diag(D) (an O(dim^3) product) for every single sample; this forms it
        # once per generation. (bounds=None, so cmaes' resampling loop never runs.)
        es = self._es
        B, D = es._eigen_decomposition()
        z = es._rng.randn(self.popsize, self.dim)  # one legacy-Gaussian stream, row after row
        return es._mean + es._sigma * (z @ (B * D).T)


class SepCMAStrategy(_CmaesStrategy):
    """Separable (diagonal) CMA-ES (cmaes.SepCMA) from mean 0, unbounded; O(dim) per sample."""

    name = "sep_cma"

    def _make(self):
        import cmaes
        if self.dim == 1:
            raise EssaError("strategy 'sep_cma' needs dim >= 2 (cmaes.SepCMA refuses 1-D problems); "
                            "use strategy 'cma' for a 1-dimensional genome")
        return cmaes.SepCMA(mean=np.zeros(self.dim), sigma=self.sigma0, bounds=None,
                            population_size=self.popsize, seed=self.seed)


# --- OpenAI-ES ------------------------------------------------------------------------------------

def centred_ranks(fitness: np.ndarray) -> np.ndarray:
    """Ranks scaled to [-0.5, 0.5] (best = +0.5); tied values share their average rank."""
    fitness = np.asarray(fitness, dtype=np.float64)
    n = len(fitness)
    ranks = np.empty(n)
    ranks[np.argsort(fitness, kind="stable")] = np.arange(n)
    _, tie_group = np.unique(fitness, return_inverse=True)
    ranks = (np.bincount(tie_group, weights=ranks) / np.bincount(tie_group))[tie_group]
    return ranks / (n - 1) - 0.5


class NESStrategy(Strategy):
    """OpenAI-ES: mirrored Gaussian samples, centred ranks, gradient ascent on the mean.

    Options: ``lr`` (default NES_LR_FACTOR·sigma0² for SGD, NES_ADAM_LR_FACTOR·sigma0 for Adam),
    ``optimizer`` ("sgd" or "adam"), ``sigma_decay`` (multiplied into sigma after every generation,
    default 1: fixed) and ``sigma_min`` (floor for the decayed sigma, default 0). Note the gradient
    estimate scales with 1/sigma, so with SGD a decaying sigma *enlarges* the steps of a fixed lr.
    """

    name = "nes"
    valid_opts = ("lr", "optimizer", "sigma_decay", "sigma_min")
    _BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8

    def __init__(self, dim, popsize, sigma0, seed, lr=None, optimizer="sgd", sigma_decay=1.0, sigma_min=0.0):
        super().__init__(dim, popsize, sigma0, seed)
        if popsize % 2:
            raise EssaError(f"strategy 'nes' uses mirrored pairs, so popsize must be even, got {popsize}; "
                            f"use popsize {popsize + 1}")
        if optimizer not in ("sgd", "adam"):
            raise EssaError(f"unknown NES optimizer {optimizer!r}; use 'sgd' or 'adam'")
        if lr is None:
            lr = NES_LR_FACTOR * self.sigma0 ** 2 if optimizer == "sgd" else NES_ADAM_LR_FACTOR * self.sigma0
        for key, value, ok in (("lr", lr, lambda v: v > 0), ("sigma_decay", sigma_decay, lambda v: 0 < v <= 1),
                               ("sigma_min", sigma_min, lambda v: v >= 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise EssaError(f"NES option {key}={value!r} is out of range; use lr > 0, "
                                f"0 < sigma_decay <= 1, sigma_min >= 0")
        self.opts = {"lr": float(lr), "optimizer": optimizer, "sigma_decay": float(sigma_decay),
                     "sigma_min": float(sigma_min)}
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._mean = np.zeros(self.dim)
        self._sigma = self.sigma0
        self._g = 0
        self._m = np.zeros(self.dim)  # Adam moments (stay zero with SGD)
        self._v = np.zeros(self.dim)

    def ask(self) -> np.ndarray:
        half = self._rng.standard_normal((self.popsize // 2, self.dim))
        return self._mean + self._sigma * np.concatenate([half, -half])

    def _update(self, solutions, fitness):
        eps = (solutions - self._mean) / self._sigma
        grad = centred_ranks(fitness) @ eps / (self.popsize * self._sigma)  # ∇ E[rank-shaped fitness]
        lr = self.opts["lr"]
        if self.opts["optimizer"] == "sgd":
            step = lr * grad
        else:
            t = self._g + 1
            self._m = self._BETA1 * self._m + (1 - self._BETA1) * grad
            self._v = self._BETA2 * self._v + (1 - self._BETA2) * grad ** 2
            m_hat, v_hat = self._m / (1 - self._BETA1 ** t), self._v / (1 - self._BETA2 ** t)
            step = lr * m_hat / (np.sqrt(v_hat) + self._ADAM_EPS)
        self._mean = self._mean + step
        self._sigma = max(self._sigma * self.opts["sigma_decay"], self.opts["sigma_min"])
        self._g += 1

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def sigma(self) -> float:
        return float(self._sigma)

    @property
    def generation(self) -> int:
        return self._g

    def _state(self):
        st = self._rng.bit_generator.state
        rng = {"bit_generator": st["bit_generator"], "state": str(st["state"]["state"]),
               "inc": str(st["state"]["inc"]), "has_uint32": int(st["has_uint32"]),
               "uinteger": int(st["uinteger"])}  # 128-bit ints as strings: safe in any JSON reader
        return ({"sigma": self._sigma, "generation": self._g, "rng": rng},
                {"mean": self._mean.copy(), "adam_m": self._m.copy(), "adam_v": self._v.copy()})

    def _load(self, state, arrays):
        r = state["rng"]
        if r["bit_generator"] != "PCG64":
            raise EssaError(f"NES checkpoint uses RNG {r['bit_generator']}, expected PCG64; "
                            f"the checkpoint was not written by essa's 'nes' strategy")
        self._rng.bit_generator.state = {"bit_generator": "PCG64",
                                         "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                                         "has_uint32": r["has_uint32"], "uinteger": r["uinteger"]}
        self._sigma, self._g = float(state["sigma"]), int(state["generation"])
        self._mean = np.array(arrays["mean"], dtype=np.float64)
        self._m = np.array(arrays["adam_m"], dtype=np.float64)
        self._v = np.array(arrays["adam_v"], dtype=np.float64)


# --- registry --------------------------------------------------------------------------------------

STRATEGIES: dict[str, type[Strategy]] = {"cma": CMAStrategy, "sep_cma": SepCMAStrategy, "nes": NESStrategy}


def resolve_name(name: str, dim: int) -> str:
    """The concrete strategy name for ``name`` ("auto" picks by dimension, see FULL_CMA_MAX_DIM)."""
    if name == "auto":
        return "cma" if dim <= FULL_CMA_MAX_DIM else "sep_cma"
    if name not in STRATEGIES:
        raise EssaError(f"unknown strategy {name!r}; choose one of: auto, {', '.join(STRATEGIES)}")
    return name


def make_strategy(name: str, dim: int, popsize: int, sigma0: float = DEFAULT_SIGMA0, seed: int = 0,
                  **opts) -> Strategy:
    """Build a strategy by name ("auto", "cma", "sep_cma" or "nes"), starting from mean 0."""
    if name != "auto" and name not in STRATEGIES:
        raise EssaError(f"unknown strategy {name!r}; choose one of: auto, {', '.join(STRATEGIES)}")
    _check_int("dim", dim, 1, "the genome dimension (number of trainable singular values)")
    _check_int("popsize", popsize, 2, f"several candidates per generation (default for dim {dim}: "
               f"{default_popsize(dim)})")
    return STRATEGIES[resolve_name(name, dim)](dim, popsize, sigma0, seed, **opts)


def strategy_from_state(meta: Mapping, arrays: Mapping[str, np.ndarray]) -> Strategy:
    """Rebuild a strategy from its state_dict() (e.g. read back from JSON and an .npz file)."""
    if meta.get("strategy") not in STRATEGIES:
        raise EssaError(f"checkpoint names unknown strategy {meta.get('strategy')!r}; it was not written by "
                        f"essa's strategies ({', '.join(STRATEGIES)})")
    es = make_strategy(meta["strategy"], meta["dim"], meta["popsize"], meta["sigma0"], meta["seed"],
                       **meta["opts"])
    es.load_state_dict(meta, arrays)
    return es


def _check_int(what: str, value, lower: int, hint: str, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lower or (
            upper is not None and value > upper):
        bound = f">= {lower}" if upper is None else f"in [{lower}, {upper}]"
        raise EssaError(f"{what} must be an integer {bound}, got {value!r}; pass {hint}")
