"""veil.lightning_modules.demo: `veil demo`, the whole framework on the embedded synthetic faces."""
