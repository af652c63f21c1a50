"""FactoredMatrix: a low-rank product ``A @ B`` kept as its two factors (TransformerLens' class, our code).

``model.OV`` ([layer head d_model d_model] = W_V @ W_O) and ``model.QK`` (W_Q @ W_K^T) are
FactoredMatrix objects: their product is d_model x d_model, but the rank is only d_head, so SVD,
eigenvalues and norms are computed from the small factors.

Conventions are TransformerLens': ``svd()`` returns ``(U, S, Vh)`` with ``U @ diag(S) @ Vh.T == AB``
(TL's ``Vh`` holds the right singular VECTORS as columns); ``eigenvalues`` are those of ``BA``
([mdim mdim]; the non-zero eigenvalues of AB and BA agree).

Example::

    OV = model.OV[1, 2]                                  # layer 1 head 2, [d_model d_model]
    OV.AB                                                # the full matrix
    U, S, Vh = OV.svd()                                  # S: [d_head]
    (OV @ resid_direction).shape                         # [d_model]
"""

from __future__ import annotations

from typing import Union

import torch


class FactoredMatrix:
    """``A [... ldim mdim] @ B [... mdim rdim]`` without forming the product (leading axes broadcast)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if A.dim() < 2 or B.dim() < 2:
            raise ValueError(f"FactoredMatrix: A and B need at least 2 dims, got {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix: inner dims differ: A {tuple(A.shape)} [... ldim mdim], "
                             f"B {tuple(B.shape)} [... mdim rdim]")
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.A = A.broadcast_to(batch + A.shape[-2:])
        self.B = B.broadcast_to(batch + B.shape[-2:])
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.shape = torch.Size(batch + (self.ldim, self.rdim))
        self.ndim = len(self.shape)

    # ---------------------------------------------------------------- products
    @property
    def AB(self) -> torch.Tensor:
        """The full product ``[... ldim rdim]``."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """``B @ A`` ``[... mdim mdim]`` (needs ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square product, got ldim {self.ldim} != rdim {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, other: Union[torch.Tensor, "FactoredMatrix"]):
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.dim() == 1:                                      # a vector [rdim] -> [... ldim]
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        if self.rdim > self.mdim:                                 # keep the low-rank inner dim (TL's rule)
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor):
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.dim() == 1:                                      # a vector [ldim] -> [... rdim]
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError("FactoredMatrix can only be multiplied by a scalar")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __getitem__(self, idx) -> "FactoredMatrix":
        """Index the leading (batch) axes, e.g. ``model.OV[layer, head]``."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.ndim - 2:
            raise IndexError(f"FactoredMatrix: index only the {self.ndim - 2} leading axes of {tuple(self.shape)}")
        return FactoredMatrix(self.A[idx], self.B[idx])

    # ---------------------------------------------------------------- spectra
    def svd(self):
        """``(U [... ldim mdim], S [... mdim], Vh [... rdim mdim])`` with ``U @ diag(S) @ Vh.T == AB``."""
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)        # A = Ua diag(Sa) Vha
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]       # [... mdim mdim]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        U = Ua @ Um
        V = (Vhm @ Vhb).transpose(-1, -2)
        return U, Sm, V

    @property
    def U(self) -> torch.Tensor:
        return self.svd()[0]

    @property
    def S(self) -> torch.Tensor:
        return self.svd()[1]

    @property
    def Vh(self) -> torch.Tensor:
        return self.svd()[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Complex eigenvalues of ``BA`` ``[... mdim]`` (the non-zero spectrum of AB)."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> torch.Tensor:
        """Frobenius norm of AB ``[...]``, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k x k`` corner of AB (cheap: only k rows of A, k columns of B)."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) @ Vh.T`` ``[... mdim rdim]``: AB with the left singular basis removed."""
        _, S, V = self.svd()
        return S[..., :, None] * V.transpose(-1, -2)

    def collapse_r(self) -> torch.Tensor:
        """``U @ diag(S)`` ``[... ldim mdim]``."""
        U, S, _ = self.svd()
        return U * S[..., None, :]

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    @property
    def pair(self):
        return self.A, self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix: shape {tuple(self.shape)}, hidden dim {self.mdim}"
