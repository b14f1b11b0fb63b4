"""tensorscope-geometry: fiber-bundle test, embedding singularities, curvature, CKA/RSA, effective rank,
superposition."""
