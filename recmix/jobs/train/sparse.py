"""Training with the sparse tables in parameter-server shards (`embedding:` in the train spec).

The model receives a `PSEmbeddingLookup` instead of local tables (model code is unchanged). Dense weights
follow the best epoch through the state_dict; the shards' rows follow it through PS checkpoints taken at
every new best epoch (`snapshot`) and loaded back when a later epoch was worse (`restore`). After
training the shards are checkpointed to `<output>/embeddings` and their actors are stopped. With
`model.memory` (LMN) the value table lives in a memory shard group (`recmix.actors.memory`) served through
the same lookup; its checkpoints are the `memory/` subfolder of each of the above.
"""

from __future__ import annotations

import shutil
import tempfile

from recmix.actors import checkpoint
from recmix.actors.group import create_memory_group
from recmix.actors.lookup import PSEmbeddingLookup, build_lookup
from recmix.models.embedding import tables_from_schema
from recmix.models.lmn import memory_tables
from recmix.platform import cluster as ray_cluster
from recmix.platform import storage
from recmix.platform.specs.cluster import ClusterConfig
from recmix.platform.specs.train import TrainSpec

from .ps_group import MEMORY, memory_shards


class ShardedTables:
    def __init__(self, spec: TrainSpec, schema, cluster: ClusterConfig | None):
        ray_cluster.connect(cluster or ClusterConfig(), include_dashboard=False)
        self.spec = spec
        self.lookup: PSEmbeddingLookup = build_lookup(spec.embedding, tables_from_schema(schema))
        self.memory_group = self.memory = None
        mcfg = memory_shards(spec)
        if mcfg is not None:
            try:
                self.memory_group = create_memory_group(mcfg, memory_tables(spec.model), detached=False)
            except BaseException:
                self.lookup.close()
                raise
            self.memory = PSEmbeddingLookup(memory_tables(spec.model), self.memory_group.client(), mcfg.optimizer)
            self.lookup.add_group(self.memory)
        self._tmp = tempfile.mkdtemp(prefix="recmix-ps-best-")

    fresh_pass = True   # batch mode: every step is a pass boundary

    def train_stream(self, batches):
        return batches

    eval_stream = train_stream

    def _uri(self, epoch: int) -> str:
        return f"{self._tmp}/epoch-{epoch}"

    def snapshot(self, epoch: int) -> None:
        self.lookup.wait()
        checkpoint.save(self.lookup.client, self._uri(epoch))
        if self.memory is not None:
            checkpoint.save(self.memory.client, storage.join(self._uri(epoch), MEMORY))

    def restore(self, epoch: int) -> None:
        self.lookup.wait()
        checkpoint.restore(self.lookup.client, self._uri(epoch))
        if self.memory is not None:     # every slot is in the checkpoint: a restore is exact
            checkpoint.restore(self.memory.client, storage.join(self._uri(epoch), MEMORY))

    def save(self, uri: str) -> dict:
        """A checkpoint of every shard's rows at `uri` (also the artifact's serving snapshot); its row counts."""
        self.lookup.wait()
        rows = checkpoint.save(self.lookup.client, uri, self.spec.storage)["rows"]
        if self.memory is not None:
            rows |= checkpoint.save(self.memory.client, storage.join(uri, MEMORY), self.spec.storage)["rows"]
        return rows

    def save_final(self) -> str:
        uri = storage.join(self.spec.output, "embeddings")
        self.save(uri)
        return uri

    def close(self) -> None:
        self.lookup.close()
        if self.memory_group is not None:
            self.memory_group.destroy()
        shutil.rmtree(self._tmp, ignore_errors=True)
