"""Reading, preprocessing and caching volumes: io (files with their geometry), preprocess (recipe and cube), dataset (the cache as batches), augment, phantoms."""
