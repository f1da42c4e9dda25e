"""The one object that owns the device mesh: ``ParallelDims``.

What to call::

    dims = ParallelDims.from_config(cfg.parallel, world_size=n)  # validates, resolves dp_shard=-1
    mesh = dims.build_mesh(device_type="cpu")   # every rank, once the process group is up
    tp_mesh = dims["tp"]                        # any axis below, or several root axes
    dims.dp_rank, dims.dp_world_size            # the loader's arguments; equal on tp/pp peers
    dims.rank_on("ep"), dims.pp_rank, dims.degrees(), dims.data_parallel_mode

Guarantees: ``from_config`` raises one ``ValueError`` line naming the key, its value and the rule
(the degrees multiply to the world size; nothing is rewritten); ``build_mesh`` needs a default
process group of exactly ``world_size`` ranks (gloo, nccl or the dry run's fake backend), raises
``ValueError`` otherwise, and creates the sub-groups of every axis below (collective: every rank
calls it); reading an axis before ``build_mesh`` raises ``RuntimeError``.

Layout. The world is a row-major grid over five root axes, outermost first::

    pp  x  dp_replicate  x  dp_shard_mod_ep  x  dp_shard_in_ep  x  tp

``dp_shard`` (the FSDP axis) is the flattened ``(dp_shard_mod_ep, dp_shard_in_ep)``. Expert
parallel is drawn from the data-parallel ranks, and optionally from the tensor-parallel ones:

    default (``parallel.ep_over_tp`` false)   ``ep = dp_shard_in_ep``: an ep group is ``ep``
        dp_shard ranks at one tp coordinate. Tokens are replicated over ``tp`` inside the MoE and
        every expert is also tensor-parallel (F-sharded) over ``tp``. ``ep`` must divide
        ``dp_shard``.
    ``parallel.ep_over_tp``                   ``ep = dp_shard_in_ep x tp``: an ep group spans
        the tp ranks too. Each tp rank routes only its own chunk of the sequence (tokens are split
        over ``tp`` inside the MoE, not replicated) and experts are whole on their ep rank, not
        tp-sharded (Megatron's expert-tensor-parallel size 1, torchtitan's ``etp = 1``). ``ep``
        must be a multiple of ``tp`` and ``ep / tp`` must divide ``dp_shard``.

``dp_shard_in_ep`` sits next to ``tp`` so that an expert all-to-all stays between neighbouring
ranks (the same node first). With ``ep == 1`` both ep axes have size 1 and ``dp_shard_mod_ep``
is ``dp_shard``. The axes a caller sees:

    ``pp``            pipeline stages (rank r holds stage r; virtual stages r, r + pp, ...).
    ``dp_replicate``  replicated data parallel (DDP, or HSDP's outer axis).
    ``dp_shard``      fully-sharded data parallel (FSDP2), flattened
                      (dp_shard_mod_ep, dp_shard_in_ep).
    ``dp``            every data-parallel rank, flattened (dp_replicate, dp_shard): the loader's
                      rank/world and the axis over which the loss is averaged.
    ``ep``            expert parallel: ranks in one ep group hold different experts and exchange
                      tokens with an all-to-all; ``dp_shard_in_ep``, or flattened
                      (dp_shard_in_ep, tp) with ``ep_over_tp``.
    ``edp``           expert data parallel, flattened (dp_replicate, dp_shard_mod_ep): ranks
                      with the same ep coordinate. FSDP2 shards expert weights over
                      ``dp_shard_mod_ep`` (HSDP with ``dp_replicate``) and averages their
                      gradients over edp.
    ``tp``            tensor (and sequence) parallel, innermost.

Example, 8 ranks, tp 2, dp_shard 4, ep 4. By default dp_shard_in_ep = 4 (rank = 2 x
dp_shard_in_ep + tp): ep groups {0, 2, 4, 6} and {1, 3, 5, 7}, one per tp coordinate, experts
F-sharded over tp, edp groups of one rank. With ``ep_over_tp``, dp_shard_in_ep = 2 and
dp_shard_mod_ep = 2 (rank = 4 x dp_shard_mod_ep + 2 x dp_shard_in_ep + tp): ep groups
{0, 1, 2, 3} and {4, 5, 6, 7}, whole experts, edp groups {0, 4}, {1, 5}, {2, 6}, {3, 7}.

No process groups are kept anywhere else: callers take the axes from this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.config import ParallelConfig, validate_parallel

ROOT_AXES = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "tp")


@dataclass
class ParallelDims:
    """Resolved parallel degrees and, once ``build_mesh`` ran, the device mesh.

    Attributes:
        pp, dp_replicate, dp_shard, tp, ep: the degrees; ``pp * dp_replicate * dp_shard * tp``
            is ``world_size`` and ``dp_shard_in_ep`` divides ``dp_shard``.
        world_size: number of ranks.
        ep_over_tp: the ep groups span the tp ranks (module docstring).
        mesh: the root ``DeviceMesh`` over ``ROOT_AXES`` (None until ``build_mesh``).
    """

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    world_size: int
    ep_over_tp: bool = False
    mesh: DeviceMesh | None = field(default=None, repr=False)
    _flat: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, *, world_size: int) -> ParallelDims:
        """Validate ``cfg`` against ``world_size`` and resolve ``dp_shard=-1``.

        Raises:
            ValueError: one line naming the key, its value and the rule broken.
        """
        degrees = validate_parallel(cfg, world_size=world_size)
        return cls(**degrees, world_size=world_size, ep_over_tp=cfg.ep_over_tp)

    def __post_init__(self) -> None:
        # Direct construction goes through the same degree rules as a config
        # (parallel.config.validate_parallel owns them); from_config has already passed them.
        degrees = validate_parallel(
            ParallelConfig(
                pp=self.pp,
                dp_replicate=self.dp_replicate,
                dp_shard=self.dp_shard,
                tp=self.tp,
                ep=self.ep,
                ep_over_tp=self.ep_over_tp,
            ),
            world_size=self.world_size,
        )
        assert degrees["dp_shard"] == self.dp_shard, "dp_shard must be resolved (not -1)"

    # ----------------------------------------------------------------------------------------
    # degrees

    @property
    def dp(self) -> int:
        """Data-parallel degree ``dp_replicate * dp_shard`` (distinct batches per step)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_in_ep(self) -> int:
        """The part of ``dp_shard`` used by expert parallel (``ep``, or ``ep / tp`` with
        ``ep_over_tp``)."""
        return self.ep // self.tp if self.ep_over_tp else self.ep

    @property
    def dp_shard_mod_ep(self) -> int:
        """The part of ``dp_shard`` not used by expert parallel."""
        return self.dp_shard // self.dp_shard_in_ep

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: ranks holding the same experts."""
        return self.dp_replicate * self.dp_shard_mod_ep

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 (or HSDP) shards parameters over ``dp_shard``."""
        return self.dp_shard > 1

    @property
    def data_parallel_mode(self) -> str:
        """``fsdp`` (dp_shard > 1, HSDP when dp_replicate > 1 too), ``hsdp_replicate`` (only
        dp_replicate > 1 with DTensor parameters from tp/ep: HSDP with shards of one rank, since
        DDP does not take DTensors), ``ddp`` (only dp_replicate > 1) or ``none``."""
        if self.dp_shard > 1:
            return "fsdp"
        if self.dp_replicate > 1:
            return "hsdp_replicate" if self.tp > 1 else "ddp"
        return "none"

    def degrees(self) -> dict[str, int]:
        """``{"pp", "dp_replicate", "dp_shard", "tp", "ep"}``."""
        return {
            "pp": self.pp,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "tp": self.tp,
            "ep": self.ep,
        }

    # ----------------------------------------------------------------------------------------
    # mesh

    def build_mesh(self, *, device_type: str = "cpu") -> DeviceMesh:
        """Build the root mesh and its flattened views (``dp_shard``, ``dp``, ``edp``, ``ep``;
        ``("ep", "tp")`` without ``ep_over_tp``).

        Needs an initialised default process group of ``world_size`` ranks (gloo, nccl or the
        fake backend of the dry run).

        Raises:
            ValueError: the process group's size is not ``world_size``.
        """
        import torch.distributed as dist

        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"world size ({dist.get_world_size()}) must equal the planned world size "
                f"({self.world_size})"
            )
        shape = (self.pp, self.dp_replicate, self.dp_shard_mod_ep, self.dp_shard_in_ep, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=ROOT_AXES)
        # Flattened views are kept here: slicing them back out of the root is deprecated.
        self._flat = {
            "dp_shard": mesh["dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp_shard"),
            "dp": mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp"),
            "edp": mesh["dp_replicate", "dp_shard_mod_ep"]._flatten("edp"),
        }
        if self.ep_over_tp:
            self._flat["ep"] = mesh["dp_shard_in_ep", "tp"]._flatten("ep")
        else:
            self._flat["ep"] = mesh["dp_shard_in_ep"]
            self._flat[("ep", "tp")] = mesh["dp_shard_in_ep", "tp"]
        # HSDP's 2-D (dp_replicate, dp_shard) mesh: the dp view cut back into its two parts.
        self._flat[("dp_replicate", "dp_shard")] = self._flat["dp"]._unflatten(
            0, (self.dp_replicate, self.dp_shard), ("dp_replicate", "dp_shard")
        )
        self.mesh = mesh
        return mesh

    def __getitem__(self, axis: str | tuple[str, ...]) -> DeviceMesh:
        """The sub-mesh of one axis (or several root axes), e.g. ``dims["tp"]``.

        Raises:
            RuntimeError: ``build_mesh`` has not run.
        """
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() must run before axes are read")
        if axis in self._flat:
            return self._flat[axis]
        return self.mesh[axis]

    def rank_on(self, axis: str) -> int:
        """This rank's coordinate on ``axis`` (0 on an axis of size 1)."""
        return self[axis].get_local_rank()

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank for the loader (over ``dp``); equal on tp and pp peers."""
        return self.rank_on("dp")

    @property
    def dp_world_size(self) -> int:
        """Data-parallel world size for the loader."""
        return self.dp

    @property
    def pp_rank(self) -> int:
        """Pipeline coordinate of this rank."""
        return self.rank_on("pp")
