"""The Ray layer: the only package that imports ``ray``.

- ``sweep``: search space -> one Ray Tune trial per model -> a Ray Train ``TorchTrainer`` around
  ``rm_sweep.train.fit`` -> checkpoint and ``models`` row in the store.
"""
