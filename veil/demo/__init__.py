"""veil.demo: `veil demo`, the whole framework on the embedded synthetic faces."""
