"""The files of an attempt: staging its inputs, its layout, manifest and container command, and its products.

``AttemptPreparation`` is what the step runner's loop asks of the file system and the container contract;
``ContainerPreparation`` is the real one (a ``Stager``, the ``ContainerRuntime``, the contract's layout and
manifest, output discovery). Every failure here is one sub-group's (``PreparationFailure`` with its
``FailureKind``): staging is tried for the whole round first and, when that fails, per sub-group, so one bad
raw package fails only the sub-groups that contain it; a full disk (ENOSPC) while writing an attempt's
directories or manifest is ``disk_full`` with the path that could not be written.
"""

from __future__ import annotations

import abc
import errno
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Engine, select

from ccat_dagster.errors import CcatError
from ccat_dagster.execution import contract
from ccat_dagster.execution.attempts import AttemptRef
from ccat_dagster.execution.discovery import DiscoveredProduct, discover_products
from ccat_dagster.execution.hpc.base import JobResources, JobSpec
from ccat_dagster.execution.hpc.local_wrapper import file_system_full
from ccat_dagster.execution.images import BuildCheck, resolve_image
from ccat_dagster.execution.planning import SubGroupPlan
from ccat_dagster.execution.runtimes import ContainerInvocation, ContainerRuntime
from ccat_dagster.execution.staging import StagedPackage, Stager, require_present_products
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import FailureKind

log = logging.getLogger(__name__)
Staged = dict[int, StagedPackage]


class PreparationFailure(CcatError):
    """One attempt could not be prepared or collected; ``kind`` says why as a type."""

    def __init__(self, message: str, *, kind: FailureKind) -> None:
        super().__init__(message)
        self.kind = kind


def disk_full_path(error: BaseException) -> str | None:
    """The path of an ENOSPC error (or of one in its cause chain), "" when it names none; None if not ENOSPC."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return str(seen.filename or "")
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full(error: BaseException, *, doing: str, fallback_path: Path) -> PreparationFailure:
    path = disk_full_path(error) or str(fallback_path)
    return PreparationFailure(
        f"the disk is full (ENOSPC) {doing}: no space left writing {path}; free space on that file system, "
        "then run the sub-group again",
        kind=FailureKind.DISK_FULL,
    )


class AttemptPreparation(abc.ABC):
    """Everything the loop needs of the file system and the container contract for one step's attempts."""

    @abc.abstractmethod
    def layout(self, sub_group_key: str, attempt_id: int) -> contract.AttemptLayout: ...

    @abc.abstractmethod
    def stage(self, plans: Sequence[SubGroupPlan]) -> dict[str, Staged | PreparationFailure]:
        """The staged inputs of each sub-group (by key), or the failure of that sub-group alone."""

    @abc.abstractmethod
    def prepare(
        self, plan: SubGroupPlan, attempt: AttemptRef, *, resources: JobResources, staged: Staged, run_id: str
    ) -> JobSpec:
        """Directories, manifest and container command of one attempt; raises ``PreparationFailure``."""

    @abc.abstractmethod
    def discover(self, layout: contract.AttemptLayout) -> list[DiscoveredProduct]:
        """The attempt's products; raises ``PreparationFailure`` (kind contract) for refused output."""

    def full_file_system(self, layout: contract.AttemptLayout) -> Path | None:
        """The first of the attempt's writable directories whose file system is full, or None (for a failed job)."""
        return None


class ContainerPreparation(AttemptPreparation):
    """Real staging, the container contract's layout and manifest, and output discovery."""

    def __init__(
        self,
        *,
        engine: Engine,
        step: StepDefinition,
        runtime: ContainerRuntime,
        stager: Stager,
        pipeline_base_dir: Path,
        processing_location_id: int,
        sif_cache_dir: Path,
        staging_timeout_seconds: float,
        pre_walltime_signal_seconds: int,
        max_products: int | None,
        progress: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.step = step
        self.runtime = runtime
        self.stager = stager
        self.base_dir = pipeline_base_dir
        self.location_id = processing_location_id
        self.sif_cache_dir = sif_cache_dir
        self.staging_timeout_seconds = staging_timeout_seconds
        self.pre_walltime_signal_seconds = pre_walltime_signal_seconds
        self.max_products = max_products
        self.progress = progress

    def layout(self, sub_group_key: str, attempt_id: int) -> contract.AttemptLayout:
        return contract.attempt_layout(
            base_dir=self.base_dir,
            pipeline=self.step.pipeline_name,
            sub_group_key=sub_group_key,
            step=self.step.step_name,
            attempt_id=str(attempt_id),
            is_final=self.step.is_final,
        )

    # ------------------------------------------------------------------ staging

    def stage(self, plans):
        try:
            staged = self._stage({p for plan in plans for p in plan.package_ids})
            return {plan.sub_group_key: {pid: staged[pid] for pid in plan.package_ids} for plan in plans}
        except (CcatError, OSError) as error:
            if len(plans) == 1:
                return {plans[0].sub_group_key: self._staging_failure(error)}
            log.warning("staging %s sub-group(s) together failed (%s); one by one instead", len(plans), error)
        out: dict[str, Staged | PreparationFailure] = {}
        for plan in plans:
            try:
                out[plan.sub_group_key] = self._stage(set(plan.package_ids))
            except (CcatError, OSError) as error:
                out[plan.sub_group_key] = self._staging_failure(error)
        return out

    def _stage(self, package_ids: set[int]) -> Staged:
        if not package_ids:
            return {}
        return self.stager.stage(
            engine=self.engine,
            package_ids=sorted(package_ids),
            processing_location_id=self.location_id,
            timeout_seconds=self.staging_timeout_seconds,
            progress=self.progress,
        )

    def _staging_failure(self, error: BaseException) -> PreparationFailure:
        if disk_full_path(error) is not None:
            return disk_full(error, doing="while staging the inputs", fallback_path=self.base_dir)
        return PreparationFailure(f"staging failed: {error}", kind=FailureKind.STAGING)

    # ------------------------------------------------------------------ one attempt

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        layout = self.layout(plan.sub_group_key, attempt.attempt_id)
        try:
            return self._prepare(plan, attempt, layout, resources, staged, run_id)
        except OSError as error:
            if disk_full_path(error) is None:
                raise PreparationFailure(
                    f"preparing attempt {attempt.attempt_id} failed: {error}", kind=FailureKind.CONTRACT
                ) from error
            raise disk_full(
                error, doing=f"while preparing attempt {attempt.attempt_id}", fallback_path=layout.attempt_dir
            ) from error
        except CcatError as error:
            raise PreparationFailure(str(error), kind=FailureKind.CONTRACT) from error

    def _prepare(self, plan, attempt, layout, resources, staged, run_id) -> JobSpec:
        step = self.step
        # ops-db first, files after: a retry after a connection failure finds nothing of this attempt on disk.
        with session_scope(self.engine) as session:
            upstream_paths = (
                require_present_products(
                    session,
                    product_ids=[p.product_id for p in plan.upstream_products],
                    processing_location_id=self.location_id,
                )
                if plan.upstream_products
                else {}
            )
        self._relocate_registered_outputs(plan, layout)
        layout.create(set_aside_previous_output=True)
        inputs = [
            contract.InputFile(
                package_id=package.package_id,
                package_name=package.package_name,
                raw_file_id=str(raw_file_id),
                relative_path=relative_path,
                size=size,
                sha256=sha256,
            )
            for package in staged.values()
            for raw_file_id, relative_path, size, sha256 in package.files
        ]
        upstream = [
            contract.UpstreamProduct(
                product_id=p.product_id,
                step=p.step_name,
                sub_group_key=p.sub_group_key,
                relative_path=p.relative_path,
                product_type=p.product_type,
                sha256=p.sha256,
                size=p.size_bytes,
                host_path=Path(upstream_paths[p.product_id]),
            )
            for p in plan.upstream_products
        ]
        image = resolve_image(
            image_ref=step.image_ref,
            image_digest=step.image_digest,
            sif_cache_dir=self.sif_cache_dir,
            runtime_name=self.runtime.name,
            check=BuildCheck(self.engine, step.software_name, step.software_version, attempt_id=attempt.attempt_id),
        )
        manifest = contract.build_manifest(
            layout=layout,
            run_id=run_id,
            software=contract.SoftwareRef(
                name=step.software_name,
                version=step.software_version,
                image_ref=step.image_ref,
                image_digest=step.image_digest,
            ),
            config=dict(step.config),
            inputs=inputs,
            upstream_products=upstream,
        )
        contract.write_manifest(layout=layout, manifest=manifest)
        mounts = contract.build_mounts(
            layout=layout,
            input_packages=[(s.package_name, s.host_dir) for s in staged.values()],
            upstream_products=upstream,
        )
        missing = contract.missing_mount_sources(mounts=mounts)
        if missing:
            raise contract.ContainerContractError(
                f"mount sources missing on this host: {', '.join(map(str, missing[:5]))}"
            )
        invocation = ContainerInvocation(
            image=image,
            mounts=mounts,
            env=contract.build_environment(layout=layout, time_limit_seconds=resources.time_limit_seconds),
            args=list(step.entrypoint),
            gpus=resources.gpus,
        )
        container = self.runtime.job_container(invocation)
        return JobSpec(
            command=self.runtime.command(invocation),
            resources=resources,
            # A host command carries its container's environment in its arguments; a Job container gets it here.
            env=dict(invocation.env) if container is not None else {},
            container=container,
            job_name=job_name(step, plan.sub_group_key, attempt.attempt_id),
            log_dir=layout.logs_dir,
            pre_walltime_signal_seconds=self.pre_walltime_signal_seconds,
        )

    def _relocate_registered_outputs(self, plan: SubGroupPlan, layout: contract.AttemptLayout) -> None:
        """Move the files of products registered by earlier attempts out of the step's output directory.

        The directory must start empty (everything in it becomes this attempt's products); earlier products
        keep their files, now under their own attempt's directory, and their PhysicalCopy paths follow.
        """
        products_dir = layout.products_dir
        if not products_dir.is_dir():
            return
        with session_scope(self.engine) as session:
            copies = session.execute(
                select(m.PhysicalCopy, m.DataProduct)
                .join(m.DataProduct, m.PhysicalCopy.data_product_id == m.DataProduct.id)
                .where(m.DataProduct.reduction_step_id == plan.step_id)
                .where(m.DataProduct.sub_group_key == plan.sub_group_key)
                .where(m.PhysicalCopy.data_location_id == self.location_id)
            ).all()
            for copy, product in copies:
                source = Path(copy.path)
                if not source.is_relative_to(products_dir) or not source.exists():
                    continue
                previous = self.layout(plan.sub_group_key, product.executed_reduction_step_id)
                target = previous.attempt_dir / "products" / product.relative_path
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
                copy.path = str(target)

    def full_file_system(self, layout):
        for directory in (layout.products_dir, layout.step_workspace_dir, layout.logs_dir):
            if file_system_full(directory):
                return directory
        return None

    # ------------------------------------------------------------------ collection

    def discover(self, layout):
        try:
            return discover_products(layout=layout, max_products=self.max_products)
        except CcatError as error:
            raise PreparationFailure(f"output collection refused: {error}", kind=FailureKind.CONTRACT) from error
        except OSError as error:
            if disk_full_path(error) is not None:
                raise disk_full(error, doing="while collecting", fallback_path=layout.products_dir) from error
            raise PreparationFailure(f"output collection failed: {error}", kind=FailureKind.CONTRACT) from error


def job_name(step: StepDefinition, sub_group_key: str, attempt_id: int) -> str:
    digest = contract.short_hash(sub_group_key)
    return f"ccat-{step.pipeline_name}-{step.step_name}-{attempt_id}-{digest}"[:120]
