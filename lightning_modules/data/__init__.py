"""Datasets (synthetic faces, CelebA, image folder + CSV) and the DataModule that serves them."""
