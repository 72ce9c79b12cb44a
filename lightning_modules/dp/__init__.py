"""DP-SGD plumbing shared by every private training loop (both LightningModules call it).

    config       DPConfig: the privacy knobs, validated where they are set (the error names the option)
    grad_sample  Opacus per-sample gradients with the conv-contiguity fix; the noise-draw fold
    accounting   sigma, delta, the accountant and the one privacy record of checkpoints and privacy.json
    optimizer    the one DP optimizer factory (dp.kernel: fused | opacus | auto)
    step         the one chunked DP step (virtual steps, empty Poisson batches, DDP sync off, accounting)

Import the submodules directly; this file imports nothing, so ``veil.lightning_modules.dp`` is cheap.
"""
