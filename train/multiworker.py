"""Training under MultiWorkerMirroredStrategy (`nebula train --strategy multiworker`) without Keras's `fit`.

Keras 3.15's `fit` cannot run with two or more workers (keras-team/keras#20585). Two
places in keras/src/backend/tensorflow/trainer.py take paths that only multi-worker runs take:
  - `_maybe_symbolic_build` (line 731) passes the whole (x, y, sample_weight) batch, a tuple
    of PerReplica values, to one `strategy.reduce("MEAN", ...)`; with several workers the
    reduction goes to collective ops (collective_all_reduce_strategy.py:957), whose
    `_make_tensor_into_per_replica` (cross_device_ops.py:124) calls `convert_to_tensor` on
    the tuple: "Attempt to convert a value (PerReplica ...) to a Tensor";
  - past that, `reduce_per_replica` (line 841) reduces every per-replica log with
    `strategy.reduce("MEAN", v, axis=0)`, and the loss is a scalar: "Invalid reduction
    dimension 0 for input with 0 dimensions".
So the training steps here are our own loop: `strategy.run` of a step that computes the
model's compiled loss, scales it by the *global* batch (the replicas' example counts
all-reduced, so a ragged last batch split unevenly still averages as one device does) and
applies the gradients with the model's optimizer, which all-reduces them. The arithmetic is
Keras's one-device `fit`: loss = sum(sample_weight * loss) / examples, per batch.

Every worker holds the whole (cached) training set in memory and builds the same seeded
pipeline, so the dataset is sharded by DATA: each worker keeps its replicas' slices of each
global batch. Keras's `predict` does work with several workers (it gathers their shares), so
validation scoring and the frozen backbone's caching stay Keras's.
"""

from __future__ import annotations

from typing import Callable


def is_multiworker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker(strategy) -> tuple[str | None, int]:
    """This process's (task type, index) in the cluster; (None, 0) outside a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy) -> bool:
    """The chief writes the run folder: the "chief" task if the cluster has one, else worker 0 (TF's convention)."""
    task_type, index = worker(strategy)
    if task_type is None:
        return True
    if "chief" in strategy.cluster_resolver.cluster_spec().jobs:
        return task_type == "chief"
    return task_type == "worker" and index == 0


def fit(model, dataset, epochs: int, strategy, end_of_epoch: Callable[[int, float], bool]) -> None:
    """Train `model` (compiled under `strategy.scope()`) on (input, label, sample weight) batches of the global batch size.

    After each epoch, `end_of_epoch(epoch, loss)` is called on every worker and returns True to
    stop; loss is the epoch's mean example loss, as Keras's fit reports it.
    """
    import keras
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = strategy.experimental_distribute_dataset(dataset.with_options(options))
    example_loss = keras.losses.get(model.loss)  # per-example losses of the compiled loss
    optimizer = model.optimizer
    with strategy.scope():  # its slots are made here, not inside the traced step
        optimizer.build(model.trainable_variables)

    def replica_step(inputs, labels, weights):
        replica = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            weighted = tf.reduce_sum(example_loss(labels, outputs) * tf.cast(weights, outputs.dtype))
            # [sum of weighted losses, examples] over every replica of every worker: one collective
            totals = replica.all_reduce("SUM", tf.stack([tf.stop_gradient(weighted), tf.cast(tf.size(labels), weighted.dtype)]))
            loss = tf.math.divide_no_nan(weighted, totals[1])  # this replica's share of the global batch's mean
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return totals

    @tf.function(reduce_retracing=True)
    def step(batch):
        return strategy.run(replica_step, args=batch)

    for epoch in range(epochs):
        loss_sum, examples = 0.0, 0.0
        for batch in batches:
            totals = strategy.experimental_local_results(step(batch))[0].numpy()  # the same on every replica
            loss_sum, examples = loss_sum + float(totals[0]), examples + float(totals[1])
        # Each new iterator draws the next seeded reshuffle, and Keras's fit makes one more per epoch
        # that it drops (keras/src/trainers/epoch_iterator.py:125, then :111): so does this loop, so
        # that epoch k trains on the batches that epoch k of a one-device run trains on.
        iter(batches)
        if end_of_epoch(epoch, loss_sum / max(examples, 1.0)):
            break
