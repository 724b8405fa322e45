"""The Ray layer: the only package that imports ``ray``.

- ``session``: starting or joining Ray, the same way for every command.
- ``trials``: models -> one Ray Tune trial each -> a Ray Train ``TorchTrainer`` around
  ``rm_sweep.train.fit`` -> checkpoint and ``models`` row in the store.
- ``attack_matrix``: crafting tasks (one per source and attack setting) and target-shard actors
  that count every job on every target and ensemble -> ``matrix`` rows.
- ``faults``: the one fault-injection hook, for the recovery tests.
- ``spot_fallback``: the autoscaler's node-type ranking for ``clusters/aws.yaml``.

``rm_sweep.pipeline`` decides what is missing and calls these inside one Ray session.
"""
