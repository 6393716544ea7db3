"""Training of the lung U-Net, the DCN and the slice probability mapping (paper 2.5, 3.2.1)."""
