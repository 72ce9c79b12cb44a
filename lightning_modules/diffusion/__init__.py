"""Diffusion math shared by training, sampling, editing and export (plain functions and nn.Modules).

    schedule  the DDPM noise schedule: scheduler config, alpha_prod_t table, the forward process q_sample
    ddim      the one DDIM implementation: grids, one invert / one denoise step, their loops
    guidance  the guided noise prediction: classifier-free and classifier guidance
    sample    drawing images for given attributes (``veil sample``), with its privacy line

Import the submodules directly; this file imports nothing.
"""
