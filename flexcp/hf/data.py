"""Dataloaders that hand every rank of a CP group the same batch.

accelerate shards a prepared dataloader over all processes. With context parallelism the
ranks of one CP group must share a batch, so the loader is re-sharded over the ``dp``
CP groups: the same thing accelerate does for its own ``cp`` mesh dimension, done on the
loader's public shard attributes (``BatchSamplerShard`` / ``IterableDatasetShard``).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from .mesh import CPMesh


def share_batches_in_cp_groups(loader: DataLoader, mesh: CPMesh) -> DataLoader:
    """Re-shard an accelerate-prepared ``loader`` over ``mesh.dp`` CP groups (in place); returns it.

    Rank ``r`` then draws the batches of data-parallel rank ``r // cp``; the loader's
    length becomes the number of batches per CP group. With a single CP group the batches
    are those of an unsharded loader (a short last batch stays short, as at cp = 1 on one
    process). A no-op at cp = 1.
    """
    if mesh.cp == 1:
        return loader
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(loader, DataLoaderDispatcher):
        raise ValueError(
            "flexcp context parallelism needs each rank to load its own batches; accelerate's dispatch_batches=True "
            "sends rank 0's batches instead: set TrainingArguments(accelerator_config={'dispatch_batches': False})"
        )
    shards = [s for s in (getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None))
              if isinstance(s, (BatchSamplerShard, IterableDatasetShard))]
    if not shards:
        raise ValueError(
            f"cannot share batches within CP groups: {type(loader).__name__} is not sharded by accelerate "
            "(expected a BatchSamplerShard or IterableDatasetShard); build it with Trainer.get_train_dataloader"
        )
    world = mesh.dp * mesh.cp
    for shard in shards:
        if shard.num_processes not in (world, mesh.dp):
            raise ValueError(
                f"the dataloader is sharded over {shard.num_processes} processes, but the run has {world} "
                f"({mesh.dp} CP groups of {mesh.cp}); prepare it with this run's accelerator"
            )
        shard.num_processes, shard.process_index = mesh.dp, mesh.dp_rank
        if mesh.dp == 1 and isinstance(shard, BatchSamplerShard):
            shard.even_batches = False  # one CP group: the batches of an unsharded loader (accelerate's world of one)
    return loader


__all__ = ["share_batches_in_cp_groups"]
