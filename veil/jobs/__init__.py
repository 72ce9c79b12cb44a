"""The command jobs: what ``veil train``, ``train-classifier``, ``edit`` and ``unlearn`` do.

A job validates its options, runs the torch library of ``veil.lightning_modules``, writes its ``--out``
folder all-or-nothing (``veil.outputs``) and records what it spent in the dataset's privacy database
(``veil.privacy``). The torch library itself knows nothing of ledgers or output folders.

    config           TrainConfig: the typed YAML schema of ``veil train`` (data, model, dp, optim, trainer)
    train            run_training: DP-SGD training of the diffusion model (``veil train``)
    train_classifier ClassifierRecipe and train_classifier (``veil train-classifier``)
    init_from        model.init_from: a public start for private fine-tuning, checked to be disjoint data
    dataset_account  the Lightning callback that records a training run in the dataset's account
    process_group    a torch.distributed group that lives only as long as the job that made it
    edit             run_edit (releases, the revision) and run_sweep (previews) (``veil edit``)
    unlearn          run_unlearn (``veil unlearn``): the update, the metrics, the retraining baseline
"""
