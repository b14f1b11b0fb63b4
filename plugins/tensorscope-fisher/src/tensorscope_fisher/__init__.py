"""tensorscope-fisher: activation Fisher-Stein, parameter Fisher (diagonal, grouped), FIM spectra, Lanczos,
K-FAC, Fisher masks and FIM hotspots."""

from .stein_api import fisher_stein, fisher_stein_eig

__all__ = ["fisher_stein", "fisher_stein_eig"]
