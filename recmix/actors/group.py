"""Shard groups: a run's embedding shards, created once by the driver and shared by its workers.

The driver calls `create_group(cfg, dims, namespace)`: the shard actors are named
`<cfg.name>-shard-<i>`, live in the run's Ray namespace and are detached, so they outlive worker
restarts (and the driver's own process on a long-lived cluster). Workers call `attach(name, namespace)`
or `attach_lookup(...)` with the small `GroupRef` the driver hands them: the layout and config come
from the shards themselves. Workers never stop the shards; the driver owns teardown
(`ShardGroup.destroy()` / `destroy_group`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recmix.actors.backend import RayShards
from recmix.actors.client import PSClient
from recmix.actors.layout import PSLayout, ps_layout
from recmix.actors.lookup import LookupMode, PSEmbeddingLookup
from recmix.platform.errors import RecmixError
from recmix.platform.specs.embedding import EmbeddingConfig


class GroupNotFound(RecmixError):
    """`attach` found no shard group of that name in that namespace."""


@dataclass(frozen=True)
class GroupRef:
    """What a worker needs to attach: the group's name (`embedding.name`) and the run's namespace."""

    name: str
    namespace: str


@dataclass
class ShardGroup:
    """The driver's handle on a group it created: `client()` for its own calls, `destroy()` at the end."""

    ref: GroupRef
    cfg: EmbeddingConfig
    layout: PSLayout
    root: str
    handles: list

    def client(self) -> PSClient:
        """A client over the group's shards (release it with `close()`; the shards keep running)."""
        return PSClient(RayShards(self.handles, self.layout), self.layout)

    def destroy(self) -> None:
        """Kill the group's shard actors (their LMDB files stay). Idempotent."""
        destroy_group(self.ref.name, self.ref.namespace)


def create_group(cfg: EmbeddingConfig, dims: dict[str, int], namespace: str, root: str | None = None) -> ShardGroup:
    """Driver: start the shard group for `dims` ({table: dim}, e.g. from `tables_from_schema`) as
    detached named actors in `namespace`. An existing group of the same name there is an error
    (attach to it, or destroy it first)."""
    from recmix.actors.actor import create_shards

    layout = ps_layout(cfg, dims)
    handles, root = create_shards(cfg, layout, root, namespace=namespace, detached=True)
    return ShardGroup(GroupRef(cfg.name, namespace), cfg, layout, root, handles)


def create_memory_group(cfg, tables: dict, namespace: str | None = None, detached: bool = True) -> ShardGroup:
    """Driver: start an LMN memory group (`memory.MemoryShardConfig`, range layout of {name: TableSpec}
    with n_ids rows each, e.g. `models.lmn.memory_tables`); workers attach to it like to an embedding group."""
    from recmix.actors.actor import create_shards
    from recmix.actors.memory import memory_layout, slab_root

    layout = memory_layout(cfg, tables)
    handles, root = create_shards(cfg, layout, slab_root(cfg), namespace=namespace, detached=detached)
    return ShardGroup(GroupRef(cfg.name, namespace), cfg, layout, root, handles)


def open_group(ref: GroupRef) -> ShardGroup:
    """Driver: take back a group that exists (a resumed driver on a long-lived cluster, where detached
    shards outlived the previous driver). `GroupNotFound` if there is none."""
    cfg, layout, root, handles = _handles(ref.name, ref.namespace)
    return ShardGroup(ref, cfg, layout, root, handles)


def _handles(name: str, namespace: str) -> list:
    import ray

    try:
        first = ray.get_actor(f"{name}-shard-0", namespace=namespace)
    except ValueError:
        raise GroupNotFound(f"no embedding shard group '{name}' in Ray namespace '{namespace}' "
                            f"(the driver creates it with recmix.actors.group.create_group)") from None
    cfg, layout, root = ray.get(first.describe.remote())
    handles = [first]
    for shard in layout.shard_names[1:]:
        try:
            handles.append(ray.get_actor(shard, namespace=namespace))
        except ValueError:
            raise GroupNotFound(f"embedding shard group '{name}' in namespace '{namespace}' is incomplete: "
                                f"actor '{shard}' is missing") from None
    return [cfg, layout, root, handles]


def attach(name: str, namespace: str) -> PSClient:
    """Worker: a client over an existing group's shards. `GroupNotFound` if there is none. The client's
    `close()` releases its transfer buffers only; the shards keep running."""
    _, layout, _, handles = _handles(name, namespace)
    return PSClient(RayShards(handles, layout), layout)


def attach_lookup(ref: GroupRef, tables: dict, mode: LookupMode = LookupMode.pass_,
                  hbm_rows: int = 1 << 20, device: torch.device | str = "cpu",
                  grad_scale: float = 1.0) -> PSEmbeddingLookup:
    """Worker: the model's `EmbeddingLookup` over an existing group (the group's optimizer); `tables`
    is {name: TableSpec} from `tables_from_schema`, and must match the group's tables. Under DDP
    pass `grad_scale=grad_scale_for(world_size)`. `close()` never stops the shards."""
    cfg, layout, _, handles = _handles(ref.name, ref.namespace)
    missing = sorted(set(tables) ^ set(layout.dims))
    if missing or any(layout.dims[t] != tables[t].dim for t in tables):
        raise RecmixError(f"embedding shard group '{ref.name}' holds tables "
                          f"{ {t: d for t, d in layout.dims.items()} }, the model needs "
                          f"{ {t: s.dim for t, s in tables.items()} }")
    client = PSClient(RayShards(handles, layout), layout)
    return PSEmbeddingLookup(tables, client, cfg.optimizer, mode=mode, hbm_rows=hbm_rows, device=device,
                             grad_scale=grad_scale, owns_shards=False)


def group_exists(name: str, namespace: str) -> bool:
    """Whether shard 0 of the group is registered (alive or restarting) in `namespace`."""
    import ray

    try:
        ray.get_actor(f"{name}-shard-0", namespace=namespace)
    except ValueError:
        return False
    return True


def destroy_group(name: str, namespace: str) -> int:
    """Driver: kill every shard actor of the group that still exists; returns how many were killed."""
    import ray

    from ray.exceptions import GetTimeoutError, RayError

    actors, i = [], 0
    while True:
        try:
            actors.append(ray.get_actor(f"{name}-shard-{i}", namespace=namespace))
        except ValueError:
            break
        i += 1
    try:   # memory shards remove their /dev/shm files; a shard that is down leaves them to the sweep
        ray.get([a.release.remote() for a in actors], timeout=30)
    except (RayError, GetTimeoutError):
        pass
    for actor in actors:
        ray.kill(actor)
    return len(actors)
