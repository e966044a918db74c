"""The process groups of one pipelined model: the pipeline's own, and data parallel beside it.

Without data parallelism the pipeline runs on one group (the world, or the caller's). With it,
the ranks form a 2-D ``DeviceMesh`` with dims ``dp`` and ``pp``: the ranks that share a ``dp``
coordinate run one whole pipeline (sends and receives stay inside that ``pp`` group) on their
replica's share of the global batch, and the ranks that hold the same stages form a ``dp`` group
over which the stage parameters are sharded (or replicated) and their gradients reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "pp")


@dataclass(frozen=True)
class ParallelGroups:
    """Where this rank sits: its pipeline group and, with data parallelism, the 2-D mesh."""

    pp_group: dist.ProcessGroup
    #: The 2-D mesh with dims ``dp`` and ``pp``; None without data parallelism.
    mesh: DeviceMesh | None = None
    #: Global ranks of every replica's pipeline, by dp index (one entry without DP).
    replica_ranks: tuple[tuple[int, ...], ...] = field(default=())

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        return None if self.mesh is None else self.mesh["dp"]

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return None if self.mesh is None else self.mesh.get_group("dp")

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank("dp")

    @property
    def dp_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.size(self.mesh.mesh_dim_names.index("dp"))

    @property
    def all_ranks(self) -> tuple[int, ...]:
        """Every global rank of the mesh (of the pipeline without DP), ascending."""
        return tuple(sorted(rank for ranks in self.replica_ranks for rank in ranks))


def _check_mesh(mesh: DeviceMesh) -> None:
    names = mesh.mesh_dim_names
    if mesh.ndim != 2 or names is None or sorted(names) != sorted(MESH_DIMS):
        raise ValueError(
            f"pp_media: mesh must be a 2-D DeviceMesh with dims ('dp', 'pp'); got "
            f"{mesh.ndim} dims named {names}. Build it with init_device_mesh(device_type, "
            "(dp_size, pp_size), mesh_dim_names=('dp', 'pp'))."
        )


def _mesh_from_world(dp_size: int, device: torch.device) -> DeviceMesh:
    world = dist.get_world_size()
    if dp_size < 1 or world % dp_size:
        raise ValueError(
            f"pp_media: dp_size {dp_size} does not divide the world of {world} ranks; "
            "use a dp_size that does (the pipeline gets world // dp_size ranks)."
        )
    return init_device_mesh(device.type, (dp_size, world // dp_size), mesh_dim_names=MESH_DIMS)


def resolve_groups(
    *,
    group: dist.ProcessGroup | None,
    mesh: DeviceMesh | None,
    dp_size: int | None,
    device: torch.device,
) -> ParallelGroups:
    """The groups ``build_vlm_pipeline`` was asked for: ``group`` (PP only), ``mesh``, or a
    ``dp_size`` x (world // dp_size) mesh over the whole world."""
    options = (("group", group), ("mesh", mesh), ("dp_size", dp_size))
    given = [name for name, value in options if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"pp_media: pass at most one of group, mesh and dp_size; got {', '.join(given)}. "
            "group is a pipeline-only process group; mesh or dp_size add data parallelism."
        )
    if mesh is None and dp_size is not None:
        mesh = _mesh_from_world(dp_size, device)
    if mesh is None:
        pp_group = group if group is not None else dist.group.WORLD
        return ParallelGroups(pp_group, None, (tuple(dist.get_process_group_ranks(pp_group)),))
    _check_mesh(mesh)
    ranks = mesh.mesh if mesh.mesh_dim_names == MESH_DIMS else mesh.mesh.transpose(0, 1)
    replicas = tuple(tuple(int(rank) for rank in row) for row in ranks.tolist())
    return ParallelGroups(mesh.get_group("pp"), mesh, replicas)
