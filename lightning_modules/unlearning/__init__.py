"""Feature unlearning, the math: a trained classifier updated to a dataset revision.

    influence       gradient differences, Hessian-vector products, CG, LiSSA, Newton (plain functions)
    curvature       the Gauss-Newton product, K-FAC, preconditioned CG / CR
    curvlinops_kfac curvlinops' K-FAC and EK-FAC as preconditioners

The LightningModule that runs an update is ``veil.lightning_modules.unlearning_module``; the job of
``veil unlearn`` is ``veil.jobs.unlearn``.
"""
