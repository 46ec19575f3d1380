"""Metrics for the cover tree: built-in vector metrics, the residual-correlation metric of a low-rank
Gaussian-process predictive process, covariance functions (RBF, Matérn 5/2), and user callables."""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import InvalidInput
from ..io.source import as_array
from ..kernels import tree as K

__all__ = ["RBF", "Matern52", "ResidualCorrelation", "resolve_metric", "VECTOR_METRICS"]

VECTOR_METRICS = {"euclidean": K.EUCLIDEAN, "manhattan": K.MANHATTAN, "chebyshev": K.CHEBYSHEV, "angular": K.ANGULAR}
_NOT_METRICS = {
    "cos": "cosine distance 1 - cos is not a metric (no triangle inequality); use 'angular' (arccos of cosine)",
    "cosine": "cosine distance 1 - cos is not a metric (no triangle inequality); use 'angular' (arccos of cosine)",
    "l2": "the cover tree returns true distances; use 'euclidean' (not squared)",
    "ip": "inner product is not a metric; use 'angular' on normalised vectors",
}
# values whose squares could overflow float64 distance sums are refused up front
_MAX_ABS = 1e150


def check_exact_in_float64(arr: np.ndarray, what: str) -> None:
    """InvalidInput when 64-bit integers in ``arr`` lie beyond 2^53, where float64 (the metrics' type) rounds them:
    2^53 and 2^53 + 1 became one value, distance 0 where it is 1 (a review)."""
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8 and arr.size and (
            int(arr.max()) > 2**53 or int(arr.min()) < -(2**53)):
        raise InvalidInput(f"{what}: {arr.dtype} values beyond 2^53 in magnitude are not exact in float64; "
                           "convert them yourself if the rounding is acceptable")


def _positive(name: str, value) -> float | np.ndarray:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError("a string")
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} must be a positive finite number (or a 1-D array of them), got {value!r}: "
                           f"{exc}") from None
    if arr.ndim > 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise InvalidInput(f"{name} must be a positive finite number (or a 1-D array of them), got {value!r}")
    return float(arr) if arr.ndim == 0 else arr.copy()


class _Covariance:
    code = -1
    name = ""

    def __init__(self, lengthscale=1.0, variance=1.0):
        self.lengthscale = _positive("lengthscale", lengthscale)
        v = _positive("variance", variance)
        if not isinstance(v, float):
            raise InvalidInput(f"variance must be a positive scalar, got {variance!r}")
        self.variance = v

    def _scaled(self, A) -> np.ndarray:
        A = np.asarray(A, dtype=np.float64)
        if A.ndim != 2:
            raise InvalidInput(f"expected a 2-D array of points, got shape {A.shape}")
        ls = self.lengthscale
        if not isinstance(ls, float) and ls.shape[0] != A.shape[1]:
            raise InvalidInput(f"lengthscale has {ls.shape[0]} entries but points have {A.shape[1]} dimensions")
        return A / ls

    def _sqdist(self, A, B) -> np.ndarray:
        a, b = self._scaled(A), self._scaled(B)
        # one coordinate at a time: the (|A|, |B|, d) difference array of the one-line form took 2 s of the
        # 32k-point, 512-inducing-point V at d = 8; the direct differences keep full accuracy (no expansion)
        out = np.zeros((a.shape[0], b.shape[0]))
        for t in range(a.shape[1]):
            diff = np.subtract.outer(a[:, t], b[:, t])
            with np.errstate(over="ignore"):  # an inf square distance is a covariance of exactly 0, as it should be
                out += diff * diff
        return out

    def __call__(self, A, B) -> np.ndarray:
        """Covariance matrix k(A_i, B_j) (plain NumPy; used to build V and in references)."""
        return self.variance * self._phi(self._sqdist(A, B))

    def diag(self, A) -> np.ndarray:
        return np.full(np.asarray(A).shape[0], self.variance)

    def spec(self) -> dict:
        ls = self.lengthscale
        return {"kernel": self.name, "lengthscale": ls if isinstance(ls, float) else ls.tolist(),
                "variance": self.variance}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lengthscale={self.lengthscale!r}, variance={self.variance!r})"


class RBF(_Covariance):
    """Squared-exponential covariance ``variance * exp(-|x - y|^2 / (2 lengthscale^2))``."""

    code = K.RBF_KERNEL
    name = "rbf"

    @staticmethod
    def _phi(r2):
        return np.exp(-0.5 * r2)


class Matern52(_Covariance):
    """Matérn 5/2 covariance ``variance * (1 + sqrt5 r + 5 r^2 / 3) exp(-sqrt5 r)``, r = |x - y| / lengthscale."""

    code = K.MATERN52_KERNEL
    name = "matern52"

    @staticmethod
    def _phi(r2):
        r = np.sqrt(5.0 * r2)
        near = r <= K.MATERN_ZERO_BEYOND  # beyond it exp(-r) is 0 and r * r may overflow (inf * 0 is NaN)
        rn = np.where(near, r, 0.0)
        return np.where(near, (1.0 + rn + rn * rn / 3.0) * np.exp(-rn), 0.0)


_KERNELS = {"rbf": RBF, "matern52": Matern52}


CHECK_ROWS = 256  # rows on which ResidualCorrelation checks that its correlations form a correlation matrix


def _check_correlations_on_a_sample(X, v, p, kd, kernel, shortfall: float = 0.0) -> None:
    """Refuse inputs whose residual correlations, on a sample of :data:`CHECK_ROWS` rows, are no correlation matrix
    (an eigenvalue below zero by more than rounding): then K(X, X) − V Vᵀ is not positive semi-definite and
    sqrt(1 − |rho|) breaks the triangle inequality. A sample may miss a violation elsewhere; one it finds is real."""
    n = X.shape[0]
    m = min(n, CHECK_ROWS)
    rows = np.arange(n) if m == n else np.sort(np.random.default_rng(0).choice(n, m, replace=False))
    vs = v[rows]
    R = kernel(X[rows], X[rows]) - vs @ vs.T
    R[np.diag_indices(m)] = p[rows]  # (a nugget on the diagonal: the correlations rho use p)
    s = 1.0 / np.sqrt(p[rows])
    low = float(np.linalg.eigvalsh(R * s[:, None] * s[None, :])[0])
    # each correlation is off by at most ~(rank + 4) eps kernel_diag / p (the tree's slack), the spectrum by m times it;
    # a p below the residual variance by a relative ``shortfall`` (accepted within the constructor's tolerance) puts
    # 1 on a diagonal that would hold up to 1 + shortfall, lowering the spectrum by up to that much (a review: a
    # shortfall of 1e-11 against the documented 1e-9·kernel_diag was refused, the message blaming v)
    tol = 4.0 * m * (v.shape[1] + 4) * 2.3e-16 * max(1.0, float(np.max(kd[rows] / p[rows]))) + shortfall
    if not low >= -tol:
        raise InvalidInput(
            f"v and p_diag do not give a residual correlation: on {m} of the rows the correlations rho have an "
            f"eigenvalue {low:.3g} < 0, so K(X, X) - v v^T is not positive semi-definite and sqrt(1 - |rho|) is not a "
            "metric; build v as L^-1 K(U, X) with this kernel (ResidualCorrelation.from_points does)")


class ResidualCorrelation:
    """Residual-correlation distance of a low-rank GP predictive process.

    ``rho(i, j) = (k(x_i, x_j) - v_i . v_j) / sqrt(p_i p_j)`` and ``d(i, j) = sqrt(1 - |rho|)``
    (``d(i, i) = 0``). ``v`` has shape (n, rank) — row i is v_i, i.e. pass ``V.T`` if you hold
    ``V = L^-1 K(U, X)`` of shape (rank, n). ``p_diag`` is the residual variance
    ``kernel_diag - |v_i|^2``, optionally plus a nugget; ``X`` (n, d) are the inputs of the
    covariance function ``kernel``. Points in a tree with this metric are row indices into ``X``.

    This is a true metric on row indices when the residual covariance K(X, X) − V Vᵀ is positive semi-definite, as it
    is for V = L⁻¹K(U, X) of this same kernel (:meth:`from_points` builds it so), and ``p_i >= kernel_diag_i -
    |v_i|^2`` (see docs/covertree.md). The constructor checks the second for every row and the first on a sample of
    :data:`CHECK_ROWS` rows, so a ``v`` made for another kernel or lengthscale is refused when the sample shows it
    (a review's example: 227 of 400 tree-walk answers were wrong on one). The default exact scan
    (``CoverTree(residual_scan=True)``) answers exactly on any inputs; the tree walk needs the metric.
    """

    def __init__(self, v, p_diag, kernel_diag, kernel, *, X, _owned: bool = False):
        if not isinstance(kernel, _Covariance):
            raise InvalidInput(f"kernel must be a kvant.RBF or kvant.Matern52 object, got {type(kernel).__name__}")
        # copies (unless from_points made them): the metric, and trees and files built on it, must not change
        # when the caller's arrays do
        copy = None if _owned else True  # None: only if the dtype or layout needs it
        X = np.array(as_array(X, "X", np.float64), order="C", copy=copy)
        v = np.array(as_array(v, "v", np.float64), order="C", copy=copy)
        if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
            raise InvalidInput(f"X must be a 2-D array (n, d) with n, d >= 1, got shape {X.shape}")
        n = X.shape[0]
        if v.ndim != 2 or v.shape[0] != n:
            raise InvalidInput(f"v must have shape (n={n}, rank), got {v.shape} (pass V.T for V of shape (rank, n))")
        p = np.array(as_array(p_diag, "p_diag", np.float64), order="C", copy=copy)
        if p.ndim > 1:
            raise InvalidInput(f"p_diag must be a 1-D array of n={n} entries, got shape {p.shape}")
        p = p.reshape(-1)
        kd = as_array(kernel_diag, "kernel_diag", np.float64)
        if kd.ndim > 1 or kd.size not in (1, n):
            raise InvalidInput(f"kernel_diag must be a scalar or have n={n} entries, got shape {kd.shape}")
        kd = np.array(np.broadcast_to(kd.reshape(-1), (n,)), order="C", copy=True)
        if p.shape[0] != n:
            raise InvalidInput(f"p_diag must have n={n} entries, got {p.shape[0]}")
        for name, a in (("X", X), ("v", v), ("p_diag", p), ("kernel_diag", kd)):
            if not np.all(np.isfinite(a)):
                raise InvalidInput(f"{name} contains NaN or inf")
        if np.any(p <= 0):
            raise InvalidInput("p_diag must be > 0 everywhere (residual variances; add a nugget for inducing points)")
        vv = np.einsum("ij,ij->i", v, v)
        with np.errstate(over="ignore", divide="ignore"):
            big = ~(np.isfinite(vv / p) & np.isfinite(kd / p))
        if big.any():
            i = int(np.argmax(big))
            raise InvalidInput(f"p_diag[{i}]={p[i]:.6g} is too small: |v|^2 / p or kernel_diag / p overflows float64 "
                               "(the metric works on v / sqrt(p)); add a nugget to p_diag")
        # rho uses the kernel's own diagonal k(x, x) = variance: a smaller kernel_diag would let p pass the check
        # below while |rho| exceeds 1 (a nugget on top of the variance is fine)
        low = kd < kernel.variance * (1.0 - 1e-9)
        if low.any():
            i = int(np.argmax(low))
            raise InvalidInput(f"kernel_diag[{i}]={kd[i]:.6g} is below the kernel's variance k(x, x) = "
                               f"{kernel.variance:.6g}, which rho uses; pass the kernel's diagonal (plus any nugget)")
        resid = kd - vv
        tol = 1e-9 * np.abs(kd)  # relative: rounding of kd - |v|^2 in another summation order
        if np.any(p < resid - tol):
            i = int(np.argmax(resid - p))
            raise InvalidInput(
                f"p_diag[{i}]={p[i]:.6g} is below the residual variance kernel_diag - |v|^2 = {resid[i]:.6g}; "
                "then |rho| can exceed 1 and sqrt(1 - |rho|) is not a metric")
        if not isinstance(kernel.lengthscale, float) and kernel.lengthscale.shape[0] != X.shape[1]:
            raise InvalidInput(f"kernel lengthscale has {kernel.lengthscale.shape[0]} entries, X has {X.shape[1]} dims")
        # within the tolerance p may still fall short of the residual variance: then |rho| <= 1 + shortfall,
        # and the tree's pruning slack covers the clamp's sqrt(shortfall) (0 for from_points: p has a nugget)
        shortfall = float(max(0.0, np.max((resid - p) / p)))
        _check_correlations_on_a_sample(X, v, p, kd, kernel, shortfall)
        self.X, self.v, self.p_diag, self.kernel_diag, self.kernel = X, v, p, kd, kernel
        self.p_shortfall = shortfall
        self._features = None

    @classmethod
    def from_points(cls, X, kernel, n_inducing: int = 512, seed: int | None = 0, jitter: float = 1e-6):
        """Inducing points U = a random subset of X; V = L^-1 K(U, X) with L L^T = K(U, U) + jitter·variance·I;
        p = max(kernel_diag - |v|^2, 0) + jitter * variance.

        ``n_inducing`` (default 512) rows of X, at most n, drawn without replacement from ``seed`` (default 0;
        None: fresh entropy) are the inducing points; ``jitter`` (default 1e-6, relative to the kernel's variance)
        keeps the Cholesky factorisation of K(U, U) stable when inducing points nearly coincide."""
        from .._config import rng

        try:
            X_in = as_array(X, "X")
            if X_in.dtype.kind not in "fiu":
                raise TypeError(f"dtype {X_in.dtype} is not a real number type")
            X = np.ascontiguousarray(X_in, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"X must be a numeric 2-D array (n, d): {exc}") from None
        check_exact_in_float64(X_in, "X")
        if X.ndim != 2 or X.shape[0] < 1:
            raise InvalidInput(f"X must be a 2-D array (n, d) with n >= 1, got shape {X.shape}")
        if not np.all(np.isfinite(X)):
            raise InvalidInput("X contains NaN or inf")
        if isinstance(n_inducing, bool) or not isinstance(n_inducing, numbers.Integral) or n_inducing < 1:
            raise InvalidInput(f"n_inducing must be a positive integer, got {n_inducing!r}")
        if not (isinstance(jitter, numbers.Real) and np.isfinite(jitter) and jitter > 0):
            raise InvalidInput(f"jitter must be a positive number, got {jitter!r}")
        if not isinstance(kernel, _Covariance):
            raise InvalidInput(f"kernel must be a kvant.RBF or kvant.Matern52 object, got {type(kernel).__name__}")
        n = X.shape[0]
        m = min(int(n_inducing), n)
        U = X[np.sort(rng(seed).choice(n, m, replace=False))]
        Kuu = kernel(U, U) + jitter * kernel.variance * np.eye(m)
        try:
            L = np.linalg.cholesky(Kuu)
        except np.linalg.LinAlgError:
            raise InvalidInput(f"K(U, U) + jitter·I is not positive definite in float64 (jitter={jitter:g}, "
                               f"{m} inducing points): raise jitter (default 1e-6)") from None
        v = np.empty((n, m))
        step = max(1, (1 << 20) // max(m, 1))  # 8 MiB blocks: larger fresh arrays page-fault on every block
        Us = np.ascontiguousarray(kernel._scaled(U))
        Xs = np.ascontiguousarray(kernel._scaled(X))
        Kux = np.empty((m, min(n, step)))
        for s in range(0, n, step):
            block = Kux[:, : min(n, s + step) - s]
            K.covariance_block(Us, Xs[s : s + step], kernel.variance, kernel.code, block)
            v[s : s + step] = np.linalg.solve(L, block).T
        kd = kernel.diag(X)
        p = np.maximum(kd - np.einsum("ij,ij->i", v, v), 0.0) + jitter * kernel.variance
        return cls(v, p, kd, kernel, X=X.copy() if np.may_share_memory(X, X_in) else X, _owned=True)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def features(self) -> np.ndarray:
        """Per-row feature vectors the Numba metric works on: [x / lengthscale, v / sqrt(p), 1 / sqrt(p), row]."""
        if self._features is None:
            n, d = self.X.shape
            m = self.v.shape[1]
            F = np.empty((n, d + m + 2))
            s = 1.0 / np.sqrt(self.p_diag)
            F[:, :d] = self.X / self.kernel.lengthscale
            F[:, d : d + m] = self.v * s[:, None]
            F[:, d + m] = s
            F[:, d + m + 1] = np.arange(n, dtype=np.float64)
            self._features = F
        return self._features

    def params(self) -> np.ndarray:
        return np.array([K.RESIDUAL, self.X.shape[1], self.v.shape[1], self.kernel.variance, self.kernel.code], float)

    def spec(self) -> dict:
        return {"name": "residual_correlation", **self.kernel.spec()}

    def pairwise(self, i, j) -> np.ndarray:
        """Distances between rows i and j (plain NumPy, for checks)."""
        i = np.asarray(i, dtype=np.int64)
        j = np.asarray(j, dtype=np.int64)
        kij = self.kernel(self.X[i], self.X[j])
        sp = np.sqrt(self.p_diag)  # (per row, not sqrt of the product: that under- or overflows at extreme variances)
        rho = (kij - self.v[i] @ self.v[j].T) / sp[i][:, None] / sp[j][None, :]
        d = np.sqrt(np.clip(1.0 - np.abs(rho), 0.0, None))
        d[i[:, None] == j[None, :]] = 0.0
        return d

    def __repr__(self) -> str:
        return f"ResidualCorrelation(n={self.n}, d={self.X.shape[1]}, rank={self.v.shape[1]}, kernel={self.kernel!r})"


class _Resolved:
    """What the tree needs to know about a metric."""

    def __init__(self, name, kernels, params, kind, slack_rel, slack_abs, obj=None):
        self.name, self.K, self.params, self.kind = name, kernels, params, kind
        self.slack_rel, self.slack_abs, self.obj = slack_rel, slack_abs, obj

    @property
    def persistable(self) -> bool:
        return self.kind != "callable"

    def __reduce__(self):
        # Pickled as the metric it was resolved from (a name, a ResidualCorrelation, a Numba function): the kernels
        # it holds are modules, which pickle cannot carry (a CoverTree sent to a process pool or a Dask worker).
        return resolve_metric, (self.name if self.obj is None else self.obj,)


_wrappers: dict = {}


def _user_kernels(f):
    """Kernels compiled for a user metric (once per function per process; not cached on disk)."""
    if f in _wrappers:
        return _wrappers[f]
    import numba

    probe = np.zeros((1, 2))
    try:  # compile it once on two float64 rows: a wrong signature fails here, not deep inside a tree kernel
        value = f(probe[0], probe[0])
        float(value)
    except Exception as exc:
        # (Called, not only compiled: an exception raised inside the parallel kernels cannot be carried out of them
        # — Numba may crash or return garbage — so a metric that raises on zero rows is refused here, before any.)
        raise InvalidInput("a callable metric must be a Numba-jitted dist(a, b) -> float taking two 1-D float64 "
                           "arrays, and must not raise for any rows (kvant calls it once on two zero rows of width 2 "
                           f"to check; give zero vectors a distance instead of dividing by their norm); the call "
                           f"failed: {type(exc).__name__}: {exc}"[:700]) from exc

    @numba.njit(nogil=True)
    def user_dist(X, i, Y, j, params):  # pragma: no cover - numba
        return f(X[i], Y[j])

    _wrappers[f] = K.make_kernels(user_dist)
    return _wrappers[f]


def resolve_metric(metric) -> _Resolved:
    if isinstance(metric, str):
        key = metric.lower()
        if key in VECTOR_METRICS:
            code = VECTOR_METRICS[key]
            # rounding slack for the pruning bound: arccos is ill-conditioned near 0, so angular gets more
            sa = 1e-7 if key == "angular" else 0.0
            return _Resolved(key, K, np.array([code, 0, 0, 0, 0], float), "vector", 1e-10, sa)
        if key in _NOT_METRICS:
            raise InvalidInput(f"metric {metric!r}: {_NOT_METRICS[key]}")
        raise InvalidInput(f"unknown metric {metric!r}; expected one of {sorted(VECTOR_METRICS)}, "
                           "a kvant.ResidualCorrelation, or a Numba-jitted dist(a, b) -> float")
    if isinstance(metric, ResidualCorrelation):
        # sqrt(1-|rho|) loses ~sqrt(eps * (1 + k/p)) to cancellation near rho = +-1: prune with a safety margin
        # |error(rho)| <= (rank + 4) eps k/p, |error(d)| <= sqrt(|error(rho)|); three distances enter a bound.
        pmin = float(metric.p_diag.min())
        ratio = max(1.0, float(metric.kernel_diag.max()) / pmin)
        slack = 3.0 * (np.sqrt((metric.v.shape[1] + 4) * 2.3e-16 * ratio) + np.sqrt(metric.p_shortfall))
        return _Resolved("residual_correlation", K, metric.params(), "index", 1e-10, slack, metric)
    try:
        from numba.extending import is_jitted
    except ImportError:  # pragma: no cover
        is_jitted = None
    if callable(metric) and is_jitted is not None and is_jitted(metric):
        # "callable:" + its name: the tree dispatches built-in behaviour (the float32 screen, slack, the angular
        # normalisation) on the name, and a user function called "chebyshev" must not get the built-in's
        name = "callable:" + getattr(metric, "__name__", "?")
        return _Resolved(name, _user_kernels(metric), np.zeros(5), "callable", 1e-9, 0.0, metric)
    raise InvalidInput(f"metric must be one of {sorted(VECTOR_METRICS)}, a kvant.ResidualCorrelation, or a "
                       f"Numba-jitted function dist(a, b) -> float; got {metric!r}")


def spec_to_metric(spec: dict, arrays: dict):
    name = spec.get("name")
    if name in VECTOR_METRICS:
        return name
    if name == "residual_correlation":
        kern = _KERNELS[spec["kernel"]](spec["lengthscale"], spec["variance"])
        return ResidualCorrelation(arrays["rc_v"], arrays["rc_p"], arrays["rc_kd"], kern, X=arrays["rc_X"])
    raise ValueError(f"unknown metric spec {spec!r}")
