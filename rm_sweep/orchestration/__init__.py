"""The Ray layer: the only package that imports ``ray``.

- ``sweep``: search space -> one Ray Tune trial per model -> a Ray Train ``TorchTrainer`` around
  ``rm_sweep.train.fit`` -> checkpoint and ``models`` row in the store.
- ``matrix``: crafting tasks (one per source and attack setting) and target-shard actors that
  score every adversarial set on every target and five-mask ensemble -> ``matrix`` rows.
- ``session``: starting or joining Ray, the same way for every command.
- ``spot_fallback``: the autoscaler's node-type ranking for ``clusters/aws.yaml``.
"""
