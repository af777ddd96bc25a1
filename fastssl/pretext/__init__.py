"""Batched pretext-task operations (inputs and pseudo-labels made on the device, no per-image loop).

color.py: CIE Lab, the quantised ab gamut, class rebalancing and decoding (colourisation, split-brain).
patches.py: rotations, jigsaw tiles and permutations, relative-position patch pairs.
"""
