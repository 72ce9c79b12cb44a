"""Plain ``nn.Module``s that know nothing of Lightning or privacy.

    unet        AttributeConditionalUNet: the attribute-conditional denoiser (diffusers UNet2DModel)
    classifier  AttributeClassifier: the GroupNorm CNN of attributes (optionally noise-conditional)
    params      which parameters train: named groups and globs (``optim.trainable``, ``optim.lr_scale``)
"""
