"""tensorscope-circuits: attention entropy, induction and previous-token heads, QK-OV circuits,
logit lens, patching, attribution."""
