"""Training jobs: the configs and recipes, ``veil train`` and ``veil train-classifier``.

    config     TrainConfig: the typed YAML schema of ``veil train`` (sections data, model, dp, optim, trainer)
    diffusion  run_training: DP-SGD training of the diffusion model (``DPDiffusionModule``)
    classifier ClassifierRecipe and train_classifier (``AttributeClassifierModule``)
    init_from  model.init_from: a public start for private fine-tuning, checked to be disjoint data
"""
