"""Feature unlearning: a trained classifier updated to a dataset revision in closed form.

    influence  the math: gradient differences, Hessian-vector products, CG, LiSSA, Newton (plain functions)
    module     FeatureUnlearningModule: the update, run by a Lightning Trainer (DDP across processes)
    job        run_unlearn (``veil unlearn``): data, the update, the metrics, the retraining baseline
"""
