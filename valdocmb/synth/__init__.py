"""Physically based T2*-weighted MRI simulator with cerebral microbleeds and their mimics.

Modules: `physics` (field model and GRE signal), `anatomy` (deformed MNI152 tissue maps), `objects`
(susceptibility sources rendered on fine grids), `simulate` (one case), `__main__` (the CLI), `figure`.
"""
