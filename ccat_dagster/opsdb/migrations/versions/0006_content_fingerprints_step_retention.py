"""content fingerprints for existing attempts; reduction_step.retention

Revision ID: 0006
Revises: 0002
Create Date: 2026-12-02 18:45:00

1. ``reduction_step.retention`` (``auto`` / ``keep`` / ``recreate``, default ``auto``): what the retention cleanup
   may do with the step's intermediate products (docs/provenance.md).
2. Input fingerprints change from version 1 (package and product *ids* with their checksums) to version 2
   (package names and checksums; upstream step, sub-group, relative path and sha256 of each product read).
   Every attempt's fingerprint is recomputed from the inputs it recorded (``run_input_package``,
   ``run_input_product``, its software version and config), so sub-groups that were up to date stay up to date
   and nothing re-runs because of the upgrade. The downgrade recomputes version 1 the same way.

The hash functions are frozen copies, so that later changes to ``execution.fingerprint`` never change what
this migration wrote.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_CHUNK = 2000


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _sha(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


def _fingerprint_v2(packages, products, software: str, digest: str | None, config_sha: str) -> str:  # type: ignore[no-untyped-def]
    return _sha(
        {
            "v": "ccat-fp-2",
            "packages": sorted([str(name), checksum] for _id, name, checksum in packages),
            "products": sorted([str(s), str(k), str(p), sha] for _id, s, k, p, sha in products),
            "software": software,
            "image_digest": digest or "",
            "config": config_sha,
        }
    )


def _fingerprint_v1(packages, products, software: str, digest: str | None, config_sha: str) -> str:  # type: ignore[no-untyped-def]
    return _sha(
        {
            "v": "ccat-fp-1",
            "packages": sorted([int(pid), checksum] for pid, _name, checksum in packages),
            "products": sorted([int(pid), sha] for pid, _s, _k, _p, sha in products),
            "software": software,
            "image_digest": digest or "",
            "config": config_sha,
        }
    )


def _rewrite_fingerprints(fingerprint) -> None:  # type: ignore[no-untyped-def]
    """Recompute every attempt's input fingerprint from its recorded inputs with ``fingerprint``."""
    bind = op.get_bind()
    meta = sa.MetaData()
    ers = sa.Table("executed_reduction_step", meta, autoload_with=bind)
    rip = sa.Table("run_input_package", meta, autoload_with=bind)
    rpr = sa.Table("run_input_product", meta, autoload_with=bind)
    pkg = sa.Table("raw_data_package", meta, autoload_with=bind)
    product = sa.Table("data_product", meta, autoload_with=bind)
    step = sa.Table("reduction_step", meta, autoload_with=bind)
    dependency = sa.Table("reduction_step_dependency", meta, autoload_with=bind)
    version = sa.Table("reduction_software_version", meta, autoload_with=bind)
    software = sa.Table("reduction_software", meta, autoload_with=bind)
    config = sa.Table("reduction_step_config", meta, autoload_with=bind)

    dependent = set(bind.scalars(sa.select(dependency.c.step_id).distinct()))
    versions = {
        vid: (f"{name}=={ver}", digest)
        for vid, name, ver, digest in bind.execute(
            sa.select(version.c.id, software.c.name, version.c.version, version.c.image_digest).join(
                software, software.c.id == version.c.reduction_software_id
            )
        )
    }
    configs = {
        cid: sha or _sha(params or {})
        for cid, sha, params in bind.execute(sa.select(config.c.id, config.c.parameters_sha256, config.c.parameters))
    }
    step_names = dict(bind.execute(sa.select(step.c.id, step.c.name)).tuples().all())
    ids = list(bind.scalars(sa.select(ers.c.id).order_by(ers.c.id)))
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        attempts = bind.execute(
            sa.select(
                ers.c.id, ers.c.reduction_step_id, ers.c.reduction_software_version_id, ers.c.reduction_step_config_id
            ).where(ers.c.id.in_(chunk))
        ).all()
        packages: dict[int, list] = defaultdict(list)
        for aid, pid, name, checksum in bind.execute(
            sa.select(rip.c.executed_reduction_step_id, pkg.c.id, pkg.c.name, pkg.c.checksum)
            .join(pkg, pkg.c.id == rip.c.raw_data_package_id)
            .where(rip.c.executed_reduction_step_id.in_(chunk))
        ):
            packages[aid].append((pid, name, checksum))
        products: dict[int, list] = defaultdict(list)
        for aid, pid, step_id, key, path, sha in bind.execute(
            sa.select(
                rpr.c.executed_reduction_step_id,
                product.c.id,
                product.c.reduction_step_id,
                product.c.sub_group_key,
                product.c.relative_path,
                product.c.sha256,
            )
            .join(product, product.c.id == rpr.c.data_product_id)
            .where(rpr.c.executed_reduction_step_id.in_(chunk))
        ):
            products[aid].append((pid, step_names[step_id], key, path, sha))
        for aid, step_id, version_id, config_id in attempts:
            soft, digest = versions[version_id]
            # Like the planner: a dependent step's fingerprint covers its upstream products, not raw packages.
            inputs = [] if step_id in dependent else packages[aid]
            value = fingerprint(inputs, products[aid], soft, digest, configs[config_id])
            bind.execute(sa.update(ers).where(ers.c.id == aid).values(input_fingerprint=value))


def upgrade() -> None:
    with op.batch_alter_table("reduction_step", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retention", sa.String(length=32), nullable=False, server_default="auto"))
    _rewrite_fingerprints(_fingerprint_v2)


def downgrade() -> None:
    _rewrite_fingerprints(_fingerprint_v1)
    # Native DROP COLUMN (SQLite >= 3.35): recreating reduction_step, batch mode's way on SQLite, would break
    # the foreign keys that point at it.
    with op.batch_alter_table("reduction_step", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("retention")
