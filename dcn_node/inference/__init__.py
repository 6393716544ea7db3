"""The DCN model (Gao et al., Medical Image Analysis 2021): networks, transforms, engine."""
