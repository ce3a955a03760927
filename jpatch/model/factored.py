"""A low-rank matrix kept as the product A @ B of its two factors, with TransformerLens's
`FactoredMatrix` interface (jpatch's own implementation, on JAX arrays): `model.OV`, `model.QK`.

Leading axes (layers, heads) broadcast between A [..., ldim, mdim] and B [..., mdim, rdim];
the SVD, norm and eigenvalues are computed from the factors, never from the full product.
"""

import operator

import jax.numpy as jnp
import numpy as np


def _array(x):
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().float().numpy()
    return jnp.asarray(x)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


class FactoredMatrix:
    """The matrix A @ B: A [..., ldim, mdim], B [..., mdim, rdim] (leading axes broadcast).

    AB, BA, T, svd() -> (U, S, V) with U @ diag(S) @ V.T == AB (V [..., rdim, mdim], as
    TransformerLens's), U / S / V, eigenvalues (of BA: those of AB but its zeros), norm()
    (Frobenius), `@` with an array, a vector or another FactoredMatrix (either side), `*` a
    scalar, indexing of leading axes (`model.OV[layer, head]`) and of the last two as
    TransformerLens's, make_even, collapse_l / collapse_r, get_corner, unsqueeze, pair."""

    __array_ufunc__ = None  # numpy_array @ factored: numpy defers to __rmatmul__

    def __init__(self, A, B):
        A, B = _array(A), _array(B)
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix needs A [..., ldim, mdim] and B [..., mdim, rdim], got shapes "
                             f"{A.shape} and {B.shape}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"Factored matrix must match on inner dimension, shapes were a: {A.shape}, b: {B.shape}")
        try:
            lead = tuple(np.broadcast_shapes(A.shape[:-2], B.shape[:-2]))
        except ValueError:
            raise ValueError(f"cannot broadcast the leading axes of A {A.shape} and B {B.shape}") from None
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.A = jnp.broadcast_to(A, lead + A.shape[-2:])
        self.B = jnp.broadcast_to(B, lead + B.shape[-2:])
        self.shape = lead + (self.ldim, self.rdim)
        self.has_leading_dims = len(lead) > 0
        self._svd = None

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def pair(self):
        return self.A, self.B

    @property
    def AB(self):
        return self.A @ self.B

    @property
    def BA(self):
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs ldim == rdim, shape was {self.shape}")
        return self.B @ self.A

    @property
    def T(self):
        return FactoredMatrix(_t(self.B), _t(self.A))

    def transpose(self, dim0=-2, dim1=-1):
        """The transpose of the matrix (its last two axes only, as `.T`)."""
        if {dim0 % self.ndim, dim1 % self.ndim} != {self.ndim - 2, self.ndim - 1}:
            raise ValueError("a FactoredMatrix transposes its last two axes only")
        return self.T

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        other = _array(other)
        if other.ndim < 2:
            return (self.A @ (self.B @ other[..., None]))[..., 0]
        if other.shape[-2] != self.rdim:
            raise ValueError(f"Right matrix must match on inner dimension, shapes were self: {self.shape}, "
                             f"other: {other.shape}")
        return FactoredMatrix(self.A, self.B @ other) if self.rdim > self.mdim else FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        other = _array(other)
        if other.shape[-1] != self.ldim:
            raise ValueError(f"Left matrix must match on inner dimension, shapes were self: {self.shape}, "
                             f"other: {other.shape}")
        if other.ndim < 2:
            return ((other[..., None, :] @ self.A) @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B) if self.ldim > self.mdim else FactoredMatrix(other, self.AB)

    def __mul__(self, scalar):
        if np.size(scalar) != 1:
            raise ValueError(f"* takes a scalar, got shape {np.shape(scalar)}; for matrix products use @")
        return FactoredMatrix(self.A * _array(scalar).reshape(()), self.B)

    __rmul__ = __mul__

    def svd(self):
        """(U [..., ldim, mdim], S [..., mdim], V [..., rdim, mdim]) with AB == U diag(S) V^T."""
        if self._svd is None:
            Ua, Sa, Vha = jnp.linalg.svd(self.A, full_matrices=False)
            Ub, Sb, Vhb = jnp.linalg.svd(self.B, full_matrices=False)
            middle = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]
            Um, Sm, Vhm = jnp.linalg.svd(middle, full_matrices=False)
            self._svd = (Ua @ Um, Sm, _t(Vhb) @ _t(Vhm))
        return self._svd

    U = property(lambda self: self.svd()[0])
    S = property(lambda self: self.svd()[1])
    V = property(lambda self: self.svd()[2])
    Vh = property(lambda self: self.svd()[2], doc="V, as TransformerLens's (deprecated there) Vh")

    @property
    def eigenvalues(self):
        """Complex eigenvalues [..., mdim] of BA (AB's, less its trailing zeros); computed on the host."""
        return jnp.asarray(np.linalg.eigvals(np.asarray(self.BA, np.float32)))

    def norm(self):
        """Frobenius norm [...]."""
        return jnp.sqrt(jnp.sum(self.S**2, axis=-1))

    def make_even(self):
        root = jnp.sqrt(self.S)
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _t(self.V))

    def collapse_l(self):
        return self.S[..., :, None] * _t(self.V)

    def collapse_r(self):
        return self.U * self.S[..., None, :]

    def unsqueeze(self, k):
        return FactoredMatrix(jnp.expand_dims(self.A, k), jnp.expand_dims(self.B, k))

    def get_corner(self, k=3):
        """The top-left k x ... x k corner of AB (every axis cut to its first k)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def __getitem__(self, idx):
        idx = tuple(idx) if isinstance(idx, tuple) else (idx,)
        idx = tuple(i if i is None or isinstance(i, slice) or i is Ellipsis else _index(i) for i in idx)
        if Ellipsis in idx:
            raise IndexError("FactoredMatrix indices take no Ellipsis: index the leading axes, then rows, columns")
        n = len([i for i in idx if i is not None])
        lead = self.ndim - 2
        if n <= lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if n == lead + 1:  # rows too, kept as an axis of length 1
            idx = idx[:-1] + (_keep(idx[-1]),)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if n == lead + 2:
            idx = idx[:-2] + (_keep(idx[-2]), _keep(idx[-1]))
            return FactoredMatrix(self.A[idx[:-1]], self.B[idx[:-2] + (slice(None), idx[-1])])
        raise IndexError(f"{idx} is too long an index for a FactoredMatrix with shape {self.shape}")

    def __repr__(self):
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"


def _index(i):
    try:
        return operator.index(i)
    except TypeError:
        return i  # an array of indices


def _keep(i):
    """An int row / column index as a slice, so the matrix keeps its two axes (as TransformerLens)."""
    if isinstance(i, int):
        return slice(i, i + 1 if i != -1 else None)
    return i
