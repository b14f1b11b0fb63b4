"""tensorscope-fisher: activation Fisher-Stein, parameter Fisher (diagonal, grouped), FIM spectra, Lanczos, K-FAC, Fisher masks and FIM hotspots."""
