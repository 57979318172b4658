"""Parameter-server tables in a Ray Train run: one shard group per run, shared by every worker.

The driver creates the group (`recmix.actors.group`, detached named actors in the run's namespace) and
destroys it at the end; workers attach by name (per-pass working sets by default, `sparse.mode`; sparse
gradients scaled by 1 / world size, as DDP averages the dense ones) and never stop it. Rank 0 alone touches snapshots, between two barriers after
every rank waited for its pushes: one inside each dense checkpoint (`ps/`, tied to the checkpoint's name, so
a resume restores exactly the rows of the checkpoint it resumes from) and one per new best epoch under the
run folder (`ps-best/`, restored exactly when a later epoch was worse).

With `model.memory` (LMN) the value table lives in a second group, the memory group (`<embedding.name>_memory`,
range-partitioned slot ids, `recmix.actors.memory`), created and destroyed with the embedding group; workers
attach to it by name, the model reads it through the same lookup (batch mode: slot ids depend on dense
weights), and every snapshot above has its memory part in a `memory/` subfolder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from recmix.platform import storage
from recmix.platform.specs.train import TrainSpec

SUBDIR = "ps"
MEMORY = "memory"     # the memory group's part of a snapshot: a subfolder of the embedding group's


def namespace(spec: TrainSpec) -> str:
    """One per run (name + output): a rerun finds a leftover group of its own run, never another run's."""
    return f"recmix-train-{spec.name}-{hashlib.sha1(spec.output.encode()).hexdigest()[:10]}"


def memory_shards(spec: TrainSpec):
    """The memory group's config, or None when the model has no `memory:`."""
    from recmix.actors.memory import memory_config

    mem = getattr(spec.model, "memory", None)
    return None if mem is None else memory_config(spec.embedding, mem.value_optimizer.value)


@dataclass
class RunGroups:
    """The driver's groups of a run: `ref` (what workers get) names the embedding group; the memory group's
    name follows from the spec (`memory_shards`)."""

    embedding: object
    memory: object = None

    @property
    def ref(self):
        return self.embedding.ref

    def destroy(self) -> None:
        self.embedding.destroy()
        if self.memory is not None:
            self.memory.destroy()


def create(spec: TrainSpec, schema) -> RunGroups:
    """Driver: fresh groups (leftover ones of this run, from a killed driver, are destroyed first)."""
    from recmix.actors.group import create_group, create_memory_group, destroy_group
    from recmix.models.embedding import tables_from_schema
    from recmix.models.lmn import memory_tables

    ns = namespace(spec)
    mcfg = memory_shards(spec)
    for name in (spec.embedding.name, *([mcfg.name] if mcfg else [])):
        destroy_group(name, ns)
    groups = RunGroups(create_group(spec.embedding, {t: s.dim for t, s in tables_from_schema(schema).items()},
                                    namespace=ns))
    if mcfg is not None:
        try:
            groups.memory = create_memory_group(mcfg, memory_tables(spec.model), namespace=ns)
        except BaseException:
            groups.destroy()
            raise
    return groups


class WorkerTables:
    """A worker's side: the model's lookup over the run's group, and rank 0's snapshot duties."""

    def __init__(self, spec: TrainSpec, schema, ref, ctx):
        from recmix.actors.group import attach_lookup
        from recmix.actors.lookup import LookupMode, grad_scale_for
        from recmix.models.embedding import tables_from_schema

        self.spec, self.ctx, self.schema = spec, ctx, schema
        self.pass_batches = spec.sparse.pass_batches
        self.fresh_pass = True
        self.lookup = attach_lookup(ref, tables_from_schema(schema), mode=LookupMode(spec.sparse.mode.value),
                                    hbm_rows=spec.sparse.hbm_rows, device=ctx.device,
                                    grad_scale=grad_scale_for(ctx.world_size))
        self.memory = None
        mcfg = memory_shards(spec)
        if mcfg is not None:
            from recmix.actors.group import GroupRef
            from recmix.models.lmn import memory_tables

            self.memory = attach_lookup(GroupRef(mcfg.name, ref.namespace), memory_tables(spec.model),
                                        mode=LookupMode.batch, device=ctx.device,
                                        grad_scale=grad_scale_for(ctx.world_size))
            self.lookup.add_group(self.memory)     # the model's one lookup serves the memory values too
        self.best_root = storage.join(spec.output, "checkpoints", spec.name, "ps-best")

    def train_stream(self, batches):
        """Pass mode: `pass_batches` batches per pass, each pass's ids pulled once (the next pass's pull
        overlapping this one's steps, its push the next one's); batch mode: the batches as they are."""
        from itertools import islice

        from recmix.actors.lookup import LookupMode, pass_ids, run_passes

        if self.lookup.mode is LookupMode.batch:
            yield from batches
            return

        def passes():
            it = iter(batches)
            while chunk := list(islice(it, self.pass_batches)):
                yield pass_ids(self.schema, chunk), chunk

        for chunk in run_passes(self.lookup, passes()):
            for i, batch in enumerate(chunk):
                self.fresh_pass = i == 0
                yield batch
        self.fresh_pass = True

    eval_stream = train_stream   # no gradient: the passes only pull (rows the run never saw are created)

    def _quiet(self) -> None:
        """Every rank's pushes have landed (barrier after the waits)."""
        self.lookup.wait()
        self.ctx.gather(0)

    def _on_rank0(self, fn) -> None:
        self._quiet()
        if self.ctx.rank == 0:
            fn()
        self.ctx.gather(0)

    def snapshot(self, epoch: int) -> None:
        from recmix.actors.snapshot import save_snapshot

        uri = storage.join(self.best_root, f"epoch-{epoch}")
        self._on_rank0(lambda: (_clear(uri, self.spec), self._save(uri, f"epoch-{epoch}", self.spec.storage)))

    def restore(self, epoch: int) -> None:
        uri = storage.join(self.best_root, f"epoch-{epoch}")
        self._on_rank0(lambda: self._restore(uri, f"epoch-{epoch}", self.spec.storage))

    def save_into(self, checkpoint_dir: str | None, checkpoint_id: str) -> None:
        """Collective: rank 0 writes the snapshot into the (local) checkpoint folder it is about to report."""
        self._on_rank0(lambda: self._save(os.path.join(checkpoint_dir, SUBDIR), checkpoint_id))

    def load_from(self, checkpoint_dir: str, checkpoint_id: str) -> None:
        """Collective: the shards return exactly to the snapshot of the checkpoint a resume starts from."""
        self._on_rank0(lambda: self._restore(os.path.join(checkpoint_dir, SUBDIR), checkpoint_id))

    def _save(self, uri: str, checkpoint_id: str, storage_cfg=None) -> None:
        from recmix.actors.snapshot import save_snapshot

        save_snapshot(self.lookup.client, uri, checkpoint_id, storage_cfg)
        if self.memory is not None:
            save_snapshot(self.memory.client, storage.join(uri, MEMORY), checkpoint_id, storage_cfg)

    def _restore(self, uri: str, checkpoint_id: str, storage_cfg=None) -> None:
        from recmix.actors.snapshot import restore_snapshot

        restore_snapshot(self.lookup.client, uri, checkpoint_id, storage_cfg)
        if self.memory is not None:
            restore_snapshot(self.memory.client, storage.join(uri, MEMORY), checkpoint_id, storage_cfg)

    def serving_snapshot(self, uri: str) -> dict:
        """Rank 0, at the end: the rows (every id the run pulled, test included) for the artifact; the memory
        values (every slot) in `<uri>/memory`, which `models.artifact.load_artifact` reads back."""
        from recmix.actors import checkpoint

        self.lookup.wait()
        rows = checkpoint.save(self.lookup.client, uri, self.spec.storage)["rows"]
        if self.memory is not None:
            rows |= checkpoint.save(self.memory.client, storage.join(uri, MEMORY), self.spec.storage)["rows"]
        return rows

    def close(self) -> None:
        self.lookup.close()   # releases the client only: the driver owns the shards


def _clear(uri: str, spec: TrainSpec) -> None:
    """A best-epoch snapshot left by an earlier attempt of this epoch (a restarted worker group) is replaced."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri, spec.storage)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
