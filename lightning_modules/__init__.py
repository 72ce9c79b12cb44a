"""veil.lightning_modules: data, plain nn.Module models, and the thin Lightning layer that trains them."""
