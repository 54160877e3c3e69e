"""Reading, preprocessing and caching volumes: io (files with their geometry), intensity (the recipes and their
inverses), cube (orientation, trimming, fit modes), preprocess (raw scans to a cache), cache (its manifest),
dataset (the cache as batches), augment, phantoms."""
